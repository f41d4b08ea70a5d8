"""Which served name runs what: compositions, and members served alone.

Whether a member can be served by itself is the method's answer (``Method.solo_plan``, carried
in ``CompositionInfo.solo``), not the catalog's: a ``mixture`` or ``logit_mix`` member is that
composition with one-hot weights (a zero-weight member never runs, so this is exactly the
member's own distribution at its configured temperature); members of ``delta`` and
``interweave`` compositions have no such meaning and are not listed; nor are the members of a
one-member composition (the composition is the member).
"""

from __future__ import annotations

from ..errors import ModelNotFoundError
from .backend import CompositionInfo
from .protocol import ModelCard, ModelList


class ModelCatalog:
    """Served names: every composition, and each member of a mixture / logit_mix by itself.

    A member is listed under its own name unless that name is taken (by a composition or a
    member of another composition); ``composition/member`` always works.
    """

    def __init__(self, infos: list[CompositionInfo]) -> None:
        self.entries: dict[str, tuple[CompositionInfo, str | None]] = {
            i.name: (i, None) for i in infos
        }
        members = [(i, m) for i in infos for m in i.members if m in i.solo]
        bare = [m for _, m in members]
        for info, member in members:
            self.entries.setdefault(f"{info.name}/{member}", (info, member))
            if bare.count(member) == 1:
                self.entries.setdefault(member, (info, member))
        self.listed = [name for name in self.entries if self._listed(name)]

    def _listed(self, name: str) -> bool:
        """Compositions, and each member once: by its bare name where it has it."""
        info, member = self.entries[name]
        return member is None or name == member or self.entries.get(member) != (info, member)

    def resolve(self, model: str) -> tuple[CompositionInfo, str | None]:
        try:
            return self.entries[model]
        except KeyError:
            raise ModelNotFoundError(
                f"the model {model!r} does not exist; served models: {self.listed}", param="model"
            ) from None

    def cards(self, created: int) -> ModelList:
        cards = []
        for name in self.listed:
            info, member = self.entries[name]
            extension = (
                {"method": info.method, "members": list(info.members)} if member is None else None
            )
            cards.append(
                ModelCard(
                    id=name,
                    created=created,
                    root=info.name,
                    parent=info.name if member else None,
                    max_model_len=info.max_context,
                    composition=extension,
                )
            )
        return ModelList(data=cards)
