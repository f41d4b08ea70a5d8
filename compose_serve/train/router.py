"""Fitting a router (``compose_serve.router.Router``) on example prompts per member.

    fit_router(lm, tokenizer, examples={member: [prompt, ...]}, layer) -> (Router, report)

1. Render every prompt exactly as the server renders a chat request (``apply_chat_template`` with
   the generation prompt; a string is one user message, a list is chat messages).
2. Split each member's prompts by the SHA-256 of the prompt text: held out when the hash is
   ``0 mod heldout_every``, train otherwise. A member given in ``heldout_examples`` instead trains
   on all its ``examples`` and is judged on the given held-out prompts (generated tasks keep their
   held-out phrasings apart).
3. Features: the base model's (adapters disabled) block-``layer`` outputs, pooled
   (``compose_serve.router.layer_features``), in length-sorted batches.
4. Standardise with the train mean / std; fit a multinomial logistic regression, class-balanced
   (each member weighs the same whatever its number of prompts), with an L2 penalty
   ``l2 / 2 * ||W||^2`` on the weights (not the bias), full-batch L-BFGS: the objective is strictly
   convex, so the result does not depend on the start.
5. A sweep (``layers=[...]``) scores each candidate on a validation split carved from the TRAIN
   part (another salted hash), refits the best on the whole train part; the held-out part never
   picks anything.

Defaults, from one experiment (SmolLM2-135M-Instruct, members add / reverse / general, 200 train
prompts each from the train templates, judged on 100 held-out prompts each from the separate
held-out templates; mean pooling):
- ``l2 = 1e-3`` (penalty on standardised features, added to the mean cross-entropy). Held-out
  accuracy is flat from 1e-4 to 1e-1 (layer 20: 0.987 at every value; 0.967 at 1, 0.937 at 10),
  and so it stays with 10 or 30 prompts per member (5 random subsets each); the held-out NLL falls
  steadily as l2 shrinks (layer 20: 0.022 at 0, 0.029 at 1e-3, 0.037 at 1e-2, 0.132 at 1). 1e-3
  keeps nearly all of that sharpness while the problem keeps a unique, finite optimum (l2 = 0 on
  separable data has none: the weights grow until a tolerance stops them); L-BFGS converges in
  about 30 of its 300 iterations.
- ``layer``: about 2/3 of the depth (20 of 30). Mean pooling beat last-token pooling at every
  layer tried (layer 20: 0.987 vs 0.93); depth mattered little past a third (layers 10-30: 0.983-1.0,
  layer 15 best at 1.0; layers 3 and 6: 0.95-0.96). ``layers=[...]`` picks one per model.
Features for 1,181 prompts to layer 20 took 90 s on one CPU thread (the whole CLI run 95 s); the fit, under
a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Sequence

import torch

from ..router import POOLINGS, Router, default_layer, multi_layer_features

DEFAULT_L2 = 1e-3
DEFAULT_HELDOUT_EVERY = 5
STD_FLOOR = 1e-4  # a (near-)constant feature is divided by this, not by ~0
MAX_ITERS = 300

Prompt = str | list[dict]


def prompt_key(prompt: Prompt) -> str:
    """The text a prompt is hashed by: the string itself, or the chat messages as sorted JSON."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def in_bucket(prompt: Prompt, every: int, salt: str = "") -> bool:
    """Whether SHA-256(salt + key) is 0 mod ``every`` (a pure function of the prompt)."""
    digest = hashlib.sha256((salt + prompt_key(prompt)).encode()).digest()
    return int.from_bytes(digest[:8], "big") % every == 0


def render(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids of a prompt as the server renders a chat request (generation prompt appended)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=False))


def base_decoder(lm):
    """``(decoder, context)``: the decoder stack of the bare base model and a context that keeps any
    PEFT adapter disabled while it runs."""
    if hasattr(lm, "disable_adapter") and hasattr(lm, "get_base_model"):  # a PeftModel
        return lm.get_base_model().get_decoder(), lm.disable_adapter()
    return lm.get_decoder(), contextlib.nullcontext()


def prompt_features(lm, tokenizer, prompts: Sequence[Prompt], layers: list[int], pooling: str,
                    batch_size: int = 16, progress: bool = True) -> dict[int, torch.Tensor]:
    """Pooled block outputs of ``prompts`` for each of ``layers``: layer -> ``[n, d]`` float32 (CPU)."""
    from tqdm.auto import tqdm

    decoder, no_adapter = base_decoder(lm)
    ids = [render(tokenizer, p) for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    chunks: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    with no_adapter, tqdm(total=len(ids), desc="router features", unit="prompt", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            rows = [ids[i] for i in order[start:start + batch_size]]
            width = max(len(r) for r in rows)
            batch = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for row, tokens in enumerate(rows):  # left padding, as the engine pads prompts
                batch[row, width - len(tokens):] = torch.tensor(tokens, dtype=torch.long)
                mask[row, width - len(tokens):] = 1
            for layer, f in multi_layer_features(decoder, batch, mask, layers, pooling).items():
                chunks[layer].append(f.cpu())
            bar.update(len(rows))
    inverse = torch.argsort(torch.tensor(order))
    return {layer: torch.cat(c)[inverse].clone() for layer, c in chunks.items()}  # clone: a normal tensor


def fit_logistic(x: torch.Tensor, y: torch.Tensor, k: int, l2: float = DEFAULT_L2, seed: int = 0,
                 max_iters: int = MAX_ITERS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class-balanced multinomial logistic regression on ``x [n, d]``, labels ``y [n]`` in 0..k-1.

    Returns ``mean [d]``, ``std [d]``, ``weight [k, d]``, ``bias [k]`` for
    ``softmax(((x - mean) / std) @ weight.T + bias)``.
    """
    x = x.float()
    mean, std = x.mean(dim=0), x.std(dim=0, unbiased=False).clamp(min=STD_FLOOR)
    z = (x - mean) / std  # [n, d]
    counts = torch.bincount(y, minlength=k).float()
    class_weight = counts.sum() / (k * counts.clamp(min=1.0))  # [k]: every member weighs the same
    gen = torch.Generator().manual_seed(seed)
    weight = (0.01 * torch.randn(k, x.shape[1], generator=gen)).requires_grad_()
    bias = torch.zeros(k, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iters, tolerance_grad=1e-6,
                            tolerance_change=1e-9, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        ce = torch.nn.functional.cross_entropy(z @ weight.T + bias, y, weight=class_weight)
        loss = ce + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return mean, std, weight.detach(), bias.detach()


def _split(examples, heldout_examples, heldout_every):
    """``(train, heldout)``: lists of ``(prompt, member index)``."""
    train, held = [], []
    for k, (name, prompts) in enumerate(examples.items()):
        for p in prompts:
            given = name in heldout_examples
            (held if not given and in_bucket(p, heldout_every) else train).append((p, k))
        held += [(p, k) for p in heldout_examples.get(name, [])]
    return train, held


def _confusion(router: Router, x: torch.Tensor, y: torch.Tensor) -> tuple[float | None, list[list[int]]]:
    k = len(router.member_names)
    confusion = torch.zeros(k, k, dtype=torch.long)  # rows: true member, columns: routed to
    if len(y) == 0:
        return None, confusion.tolist()
    predicted = router.probs(x).argmax(dim=-1)
    confusion.index_put_((y, predicted), torch.ones_like(y), accumulate=True)
    return float((predicted == y).float().mean()), confusion.tolist()


def _check_args(examples, heldout_examples, layer, layers, pooling, num_layers, heldout_every, l2):
    from ..errors import ConfigError

    if len(examples) < 2:
        raise ConfigError(f"a router needs examples of at least two members, got {list(examples)}", param="examples")
    unknown = sorted(set(heldout_examples) - set(examples))
    if unknown:
        raise ConfigError(f"held-out examples for {unknown}, which have no train examples", param="examples")
    if pooling not in POOLINGS:
        raise ConfigError(f"pooling must be one of {list(POOLINGS)}, got {pooling!r}", param="pooling")
    for candidate in ([layer] if layer is not None else []) + list(layers or []):
        if not isinstance(candidate, int) or not 1 <= candidate <= num_layers:
            raise ConfigError(f"layer must be in 1..{num_layers} (the base model's decoder layers), got "
                              f"{candidate!r}", param="layers" if layers else "layer")
    if heldout_every < 2 or l2 < 0:
        raise ConfigError(f"heldout_every must be >= 2 and l2 >= 0, got {heldout_every}, {l2}", param="examples")


def fit_router(
    lm, tokenizer, examples: dict[str, list[Prompt]], layer: int | None = None, pooling: str = "mean",
    heldout_every: int = DEFAULT_HELDOUT_EVERY, l2: float = DEFAULT_L2, seed: int = 0, batch_size: int = 16,
    progress: bool = True, heldout_examples: dict[str, list[Prompt]] | None = None,
    layers: list[int] | None = None,
) -> tuple[Router, dict]:
    """Fit a router for the members named in ``examples`` (their order is the router's column order).

    ``layer`` defaults to about 2/3 of the depth; ``layers`` sweeps candidates instead (see the module
    docstring). Returns the router and a report: sizes per member, held-out accuracy, the confusion
    matrix (rows: true member, columns: routed to, in member order), layer, pooling, the sweep.
    """
    from ..errors import ConfigError

    started = time.perf_counter()
    heldout_examples = dict(heldout_examples or {})
    decoder, _ = base_decoder(lm)
    num_layers = len(decoder.layers)
    _check_args(examples, heldout_examples, layer, layers, pooling, num_layers, heldout_every, l2)
    names = list(examples)
    train, held = _split(examples, heldout_examples, heldout_every)
    empty = [n for k, n in enumerate(names) if not any(m == k for _, m in train)]
    if empty:
        raise ConfigError(f"members {empty} have no train prompts (every prompt fell in the held-out bucket, "
                          "or none was given)", param="examples")
    candidates = sorted(set(layers)) if layers else [layer if layer is not None else default_layer(num_layers)]
    prompts = [p for p, _ in train + held]
    features = prompt_features(lm, tokenizer, prompts, candidates, pooling, batch_size, progress)
    y_train = torch.tensor([k for _, k in train], dtype=torch.long)
    y_held = torch.tensor([k for _, k in held], dtype=torch.long)
    sweep = _sweep(features, train, y_train, names, pooling, l2, seed) if len(candidates) > 1 else None
    # ties go to the shallowest layer: the router reads the prompt through layers 1..L only
    chosen = max(sweep, key=lambda c: (sweep[c], -c)) if sweep else candidates[0]
    x_train, x_held = features[chosen][: len(train)], features[chosen][len(train):]
    mean, std, weight, bias = fit_logistic(x_train, y_train, len(names), l2, seed)
    router = Router(names, chosen, pooling, mean, std, weight, bias)
    accuracy, confusion = _confusion(router, x_held, y_held)
    train_accuracy, _ = _confusion(router, x_train, y_train)
    train_keys = {prompt_key(p) for p, _ in train}
    report = {
        "members": names, "layer": chosen, "pooling": pooling, "l2": l2, "seed": seed,
        "heldout_source": {n: "given" if n in heldout_examples else f"hash 1/{heldout_every}" for n in names},
        "train_size": {n: int((y_train == k).sum()) for k, n in enumerate(names)},
        "heldout_size": {n: int((y_held == k).sum()) for k, n in enumerate(names)},
        "heldout_accuracy": accuracy, "confusion": confusion, "train_accuracy": train_accuracy,
        "heldout_also_in_train": sum(prompt_key(p) in train_keys for p, _ in held),
        "layer_sweep": {str(c): a for c, a in sweep.items()} if sweep else None,
        "num_layers": num_layers, "seconds": round(time.perf_counter() - started, 2),
    }
    router.settings = {"model": getattr(getattr(lm, "config", None), "name_or_path", None), "l2": l2, "seed": seed,
                       "heldout_accuracy": accuracy}
    return router, report


def _sweep(features, train, y_train, names, pooling, l2, seed) -> dict[int, float]:
    """Validation accuracy per candidate layer, on a hash split of the TRAIN part only."""
    from ..errors import ConfigError

    val = torch.tensor([in_bucket(p, DEFAULT_HELDOUT_EVERY, salt="validation\n") for p, _ in train])
    if val.all() or not val.any() or len(set(y_train[~val].tolist())) < len(names):
        raise ConfigError("too few train prompts to carve a validation split for the layer sweep "
                          f"({int(val.sum())} of {len(train)} fell in it)", param="layers")
    out = {}
    for layer, x in features.items():
        x_train = x[: len(train)]
        mean, std, weight, bias = fit_logistic(x_train[~val], y_train[~val], len(names), l2, seed)
        router = Router(names, layer, pooling, mean, std, weight, bias)
        out[layer], _ = _confusion(router, x_train[val], y_train[val])
    return out


# -- compose-serve fit-router ------------------------------------------------------------------

TASK_TRAIN_N = 300  # train prompts per --task member (the first N distinct)
TASK_HELDOUT_N = 100  # held-out prompts per --task member


def add_fit_router(subparsers):
    """Register ``fit-router`` on an argparse ``subparsers`` object; sets ``func=run_fit_router``."""
    p = subparsers.add_parser("fit-router", help="fit the prompt router of a routed composition")
    p.add_argument("--config", required=True, help="the composition (YAML or built-in name); its members are "
                                                   "the router's classes, their shared model the base")
    p.add_argument("--examples", action="append", default=[], metavar="MEMBER=FILE.jsonl",
                   help='prompts of one member, a JSONL of {"prompt": ...} or {"messages": [...]} (repeatable)')
    p.add_argument("--task", action="append", default=[], metavar="NAME",
                   help="the member NAME gets the generated task NAME's prompts (repeatable)")
    p.add_argument("--out", required=True, help="folder for router.safetensors and router.json")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--layer", type=int, default=None, help="decoder layer of the features (default ~2/3 deep)")
    where.add_argument("--layers", default=None, help="candidate layers L1,L2,... chosen on a validation split")
    p.add_argument("--pooling", choices=POOLINGS, default="mean")
    p.add_argument("--n-per-member", type=int, default=None,
                   help=f"at most N prompts per member (default: {TASK_TRAIN_N} per task, every line of a file)")
    p.add_argument("--n-heldout", type=int, default=TASK_HELDOUT_N, help="held-out prompts per --task member")
    p.add_argument("--l2", type=float, default=DEFAULT_L2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.set_defaults(func=run_fit_router)
    return p


def run_fit_router(args) -> int:
    """Load the base, gather the prompts, fit, print the held-out table, save; exit status 0."""
    from ..config import load_composition
    from ..members.hf import load_causal_lm, load_tokenizer
    from .lora import invocation

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = load_composition(args.config)
    names = [m.name for m in spec.members]
    model, revision = _shared_base(spec)
    examples, heldout = _gather(args, names)
    layers = _parse_layers(args.layers)
    lm = load_causal_lm(model, torch.float32, torch.device("cpu"), revision=revision)
    tokenizer = load_tokenizer(model, revision=revision)
    router, report = fit_router(lm, tokenizer, {n: examples[n] for n in names}, layer=args.layer,
                                pooling=args.pooling, l2=args.l2, seed=args.seed, batch_size=args.batch_size,
                                heldout_examples=heldout, layers=layers)
    router.settings.update(model=model, revision=revision, composition=spec.name, report=report,
                           command=invocation())
    router.save(args.out)
    print(format_report(report))
    print(f"router written to {args.out}")
    return 0


def _shared_base(spec) -> tuple[str, str | None]:
    from ..errors import ConfigError

    bases = {(m.model, m.revision) for m in spec.members}
    if len(bases) != 1:
        raise ConfigError("a router reads the members' shared base model, but the members use "
                          f"{ {m.name: m.model for m in spec.members} }", param="members")
    return bases.pop()


def _gather(args, names: list[str]) -> tuple[dict[str, list[Prompt]], dict[str, list[Prompt]]]:
    """Train prompts per member (files and tasks) and the given held-out prompts (tasks)."""
    from ..errors import ConfigError
    from . import tasks

    examples: dict[str, list[Prompt]] = {}
    heldout: dict[str, list[Prompt]] = {}
    sources = [(s, "examples") for s in args.examples] + [(f"{t}=", "task") for t in args.task]
    for source, param in sources:
        member, _, path = source.partition("=")
        if param == "examples" and not path:
            raise ConfigError(f"--examples takes MEMBER=FILE.jsonl, got {source!r}", param="examples")
        if member not in names:
            raise ConfigError(f"{param} member {member!r} is not in the composition; its members are {names}",
                              param=param)
        if member in examples:
            raise ConfigError(f"member {member!r} is given examples twice", param=param)
        if param == "examples":
            examples[member] = read_prompts(path)[: args.n_per_member]
            continue
        try:
            tasks.get_task(member)
        except KeyError as exc:
            raise ConfigError(str(exc.args[0]), param="task") from None
        examples[member] = _first_distinct(tasks.train_stream(member, args.seed), args.n_per_member or TASK_TRAIN_N)
        heldout[member] = [e.prompt for e in tasks.heldout(member, args.n_heldout)]
    missing = [n for n in names if n not in examples]
    if missing:
        raise ConfigError(f"members {missing} have no examples; give each member --examples MEMBER=FILE or "
                          "--task MEMBER", param="examples")
    return examples, heldout


def _first_distinct(stream, n: int, patience: int = 2000) -> list[str]:
    """The first ``n`` distinct prompts of an endless stream, or all it has (a finite pool repeats:
    stop after ``patience`` draws in a row bring nothing new)."""
    seen: dict[str, None] = {}
    stale = 0
    for item in stream:
        stale = stale + 1 if item.prompt in seen else 0
        seen.setdefault(item.prompt, None)
        if len(seen) == n or stale == patience:
            break
    return list(seen)


def read_prompts(path: str) -> list[Prompt]:
    """Prompts of a JSONL file: each line ``{"prompt": str}`` or ``{"messages": [...]}``."""
    from pathlib import Path

    from ..errors import ConfigError

    if not Path(path).is_file():
        raise ConfigError(f"examples file {path!r} does not exist", param="examples")
    prompts: list[Prompt] = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt = row["prompt"] if "prompt" in row else row["messages"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigError(f'{path}:{number}: expected {{"prompt": ...}} or {{"messages": [...]}}',
                              param="examples") from None
        prompts.append(prompt)
    if not prompts:
        raise ConfigError(f"examples file {path!r} holds no prompts", param="examples")
    return prompts


def _parse_layers(text: str | None) -> list[int] | None:
    from ..errors import ConfigError

    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--layers takes L1,L2,..., got {text!r}", param="layers") from None


def format_report(report: dict) -> str:
    """The held-out accuracy line, the layer sweep, and the confusion matrix as a small table."""
    names, held = report["members"], report["heldout_size"]
    acc = report["heldout_accuracy"]
    lines = [f"held-out routing accuracy: {'n/a' if acc is None else f'{acc:.3f}'} (n={sum(held.values())}) "
             f"at layer {report['layer']} of {report['num_layers']}, {report['pooling']} pooling; "
             f"train n={sum(report['train_size'].values())}"]
    if report["layer_sweep"]:
        lines.append("validation accuracy by layer: " + ", ".join(
            f"{layer}: {a:.3f}" for layer, a in report["layer_sweep"].items()))
    width = max(len(n) for n in [*names, "true \\ routed"]) + 2
    lines.append("true \\ routed".ljust(width) + "".join(n.rjust(width) for n in names))
    for name, row in zip(names, report["confusion"], strict=True):
        lines.append(name.ljust(width) + "".join(str(c).rjust(width) for c in row))
    return "\n".join(lines)
