"""Ray Serve deployments of compose-serve (imported as ``compose_serve.deployments``).

``build_app(configs)`` binds the application; ``app_builder`` serves ``serve run`` configs.
The engine never imports Ray: everything Ray-specific lives in this package.
"""

from .builder import app_builder, build_app

__all__ = ["app_builder", "build_app"]
