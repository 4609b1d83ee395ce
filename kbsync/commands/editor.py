"""`kbsync editor train|stats|figure` and `kbsync eval`: train editors, compute statistics, evaluate methods."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from kbsync.commands.common import ConfigOpt, ModelOpt, console, esc, quiet_transformers, settings_from
from kbsync.errors import BadInput

editor_app = typer.Typer(help="Train the KnowledgeEditor, compute locate-and-edit statistics, inspect editors.", no_args_is_help=True)

DataOpt = Annotated[str, typer.Option("--data", help="facts | counterfact:PATH | zsre:PATH (or a path).")]
LimitOpt = Annotated[Optional[int], typer.Option("--limit", help="Use only the first N records.")]
EditorOpt = Annotated[Optional[str], typer.Option("--editor", help="Trained editor checkpoint (editor.safetensors).")]


def _setup(config: str | None, model: str | None):
    quiet_transformers()
    from adapters import load_adapter

    settings = settings_from(config, model)
    return settings, load_adapter(settings)


@editor_app.command("train")
def train(
    data: DataOpt = "facts",
    model: ModelOpt = None,
    config: ConfigOpt = None,
    out: Annotated[Optional[str], typer.Option("--out", help="Output directory (default: the model's editor dir).")] = None,
    steps: int = 1000,
    batch: int = 8,
    lr: float = 3e-4,
    margin: float = 1e-2,
    constraint: Annotated[str, typer.Option(help="kl (C_KL) or l2 (C_L2).")] = "kl",
    paraphrases: Annotated[bool, typer.Option("--paraphrases", help="KE + P^x: supervise paraphrases too.")] = False,
    limit: LimitOpt = None,
    lstm_hidden: int = 128,
    cond_dim: int = 1024,
    lagrange_init: Annotated[float, typer.Option(help="Starting Lagrange multiplier.")] = 0.0,
    cond_norm: Annotated[bool, typer.Option("--cond-norm", help="LayerNorm on the condition vector h (new editors only; it was the cure for older editors' unbounded h, which saturated the heads; h is now tanh-bounded as in the paper's code).")] = False,
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing of the edit loss (and of the gradient the editor reads); a shift that flattens the output lowers a smoothed loss whatever the fact (benchmarks/RESULTS.md).")] = 0.1,
    eval_every: Annotated[int, typer.Option(help="Validate (and maybe anneal the margin) every N steps.")] = 50,
    checkpoint_every: Annotated[int, typer.Option(help="Write a checkpoint every N steps.")] = 100,
    skip: Annotated[int, typer.Option("--skip", help="Leave out the first N records (hold them out for `kbsync eval --limit N`).")] = 0,
    exclude: Annotated[list[str], typer.Option("--exclude", help="Leave out records whose prompt mentions this (held-out subjects); repeatable.")] = [],  # noqa: B006
    own_answers: Annotated[bool, typer.Option("--own-answers/--gold-answers",
                           help="Originals and retain answers from the model's own predictions (what edits must keep) or the data's.")] = True,
    answer_style: Annotated[str, typer.Option(help="Fact-table targets as the relation's claim (claim), the bare object (bare), or auto: claim for chat models; use what [editor] answer_style edits with.")] = "auto",
    targets: Annotated[str, typer.Option(help="New targets to train on: the data's (other KB objects of the property, CounterFact's target_new, zsRE's alt) or beam (the model's own beam hypotheses other than its answer, 2 per record).")] = "data",
    sequence: Annotated[int, typer.Option(help="Train on sequences of N edits applied to the model in the loop, so that edits compose (0: the paper's one edit on the unedited model).")] = 0,
    lookback: Annotated[int, typer.Option(help="With --sequence: earlier edits of a sequence whose losses are re-scored each step.")] = 4,
    discount: Annotated[float, typer.Option(help="With --sequence: an earlier edit's loss counts discount^age.")] = 0.9,
    eval_sequence: Annotated[int, typer.Option(help="Validate stacking over N validation edits in a row (0: --sequence's length).")] = 0,
    max_seconds: Annotated[float, typer.Option(help="Stop (with a checkpoint) after this much wall time; 0: run to --steps.")] = 0.0,
    preserve: Annotated[bool, typer.Option("--preserve", help="Project every predicted update onto the null space of preserved knowledge before scoring it (edit with ke+preserve / ke-loop+preserve to match).")] = False,
) -> None:
    """Train a hyper-network for the model; checkpoints as it goes and resumes from --out."""
    from editor.data import beam_targets, ground, load_records
    from editor.hypernet import HyperConfig
    from editor.ke import editor_dir
    from editor.train import TrainConfig, Trainer

    if constraint not in ("kl", "l2"):
        raise typer.BadParameter("constraint must be kl or l2")
    if targets not in ("data", "beam"):
        raise BadInput(f"--targets {targets!r}: use data or beam")
    if not 0 <= label_smoothing < 1:
        raise BadInput(f"--label-smoothing {label_smoothing}: must be in [0, 1)")
    if sequence < 0 or lookback < 0 or eval_sequence < 0 or max_seconds < 0:
        raise BadInput("--sequence, --lookback, --eval-sequence and --max-seconds must not be negative")
    if not 0 < discount <= 1:
        raise BadInput(f"--discount {discount}: must be in (0, 1]")
    settings, adapter = _setup(config, model)
    records = load_records(data, limit, answer_style=adapter.answer_style(answer_style))[skip:]
    records = [r for r in records if not any(x.lower() in r.prompt.lower() for x in exclude)]
    out_dir = Path(out) if out else editor_dir(settings.store.data_path, adapter.name)
    if own_answers:
        with console.status(f"asking the model for its own answers ({len(records)} records)"):
            records = ground(adapter, records, cache=out_dir / "answers.json")
    if targets == "beam":
        with console.status(f"beam search for other likely answers ({len(records)} records)"):
            records = beam_targets(adapter, records)
        if not records:
            raise BadInput("the model's beam search gave no answer other than its own for any record")
    trainer = Trainer(adapter, records, out_dir,
                      TrainConfig(steps=steps, batch=batch, lr=lr, margin=margin, constraint=constraint,
                                  paraphrases=paraphrases, lagrange_init=lagrange_init,
                                  eval_every=eval_every, checkpoint_every=checkpoint_every,
                                  sequence=sequence, lookback=lookback, discount=discount,
                                  eval_sequence=eval_sequence, max_seconds=max_seconds, preserve=preserve),
                      HyperConfig(lstm_hidden=lstm_hidden, cond_dim=cond_dim, label_smoothing=label_smoothing,
                                  cond_norm=cond_norm))
    if trainer.step:
        console.print(f"resuming from step {trainer.step} in {esc(out_dir)}")
    with Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task("train", total=steps, completed=trainer.step, info="")

        def show(m: dict[str, float]) -> None:
            info = f"loss {m['loss']:.3f} C {m['constraint']:.4f} λ {m['lambda']:.3f}"
            if "val_success" in m:
                info += f" val {m['val_success']:.0%}"
            if "val_kept" in m:
                info += f" kept {m['val_kept']:.0%}"
            bar.update(task, completed=m["step"], info=info)

        final = trainer.run(show)
    console.print(esc(f"editor written to {trainer.checkpoint} (metrics log {out_dir / 'metrics.jsonl'})"))
    console.print({k: round(v, 4) if isinstance(v, float) else v for k, v in final.items()})


def _method_options(settings, adapter, editor: str | None, ft_lr: float, ft_steps: int, loop: int) -> dict[str, dict]:
    ke = {"data_dir": settings.store.data_path, "checkpoint": editor}
    ft = {"lr": ft_lr, "max_steps": ft_steps}
    return {"ke": ke, "ke-loop": {**ke, "loop": loop}, "ft-layer": ft, "ft-all": ft, "zhu": ft, "ft": ft}


def parse_method_options(specs: list[str], methods: list[str]) -> dict[str, dict[str, Any]]:
    """{method: {key: value}} from METHOD:KEY=VALUE specs; BadInput naming a malformed one or a method not run."""
    from editor.evaluate import base_method
    from kbsync.commands.edit import parse_option

    run = {base_method(m) for m in methods}
    out: dict[str, dict[str, Any]] = {}
    for spec in specs:
        name, colon, rest = spec.partition(":")
        name = base_method(name.strip())
        malformed = BadInput(f"--option {spec!r}: expected METHOD:KEY=VALUE (e.g. gated:v_steps=40)")
        if not colon or not name:
            raise malformed
        try:
            key, value = parse_option(rest)  # KEY=VALUE as `kbsync edit -o` reads it
        except BadInput:
            raise malformed from None
        if name not in run:
            raise BadInput(f"--option {spec!r}: {name} is not one of the methods run ({', '.join(sorted(run))})")
        out.setdefault(name, {})[key] = value
    return out


COLUMNS = [("success_em", "success (EM)"), ("success_tf", "success (TF tok)"), ("retain_acc", "retain acc"),
           ("retain_tf", "retain TF tok"),
           ("equiv_em", "equiv (EM)"), ("equiv_tf", "equiv (TF tok)"), ("deterioration", "perf. det."),
           ("retain_kl", "retain KL"), ("latency_s", "latency s"), ("steps", "steps"),
           ("scale", "delta scale")]


# `kbsync eval --sequential`: the end state after every edit, stacked.
SEQUENTIAL_COLUMNS = [("success_em", "success (EM)"), ("kept_em", "kept at end (EM)"), ("equiv_em", "equiv at end (EM)"),
                      ("retain_acc", "retain acc"), ("retain_tf", "retain TF tok"), ("deterioration", "perf. det."),
                      ("latency_s", "latency s")]


def results_table(rows: list[dict], title: str, columns: list[tuple[str, str]] = COLUMNS) -> Table:
    """The evaluation rows as a rich table (the paper's Table 1 columns unless told otherwise)."""
    table = Table(title=esc(title))
    table.add_column("method")
    for _, name in columns:
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(esc(r["method"]), *("nan" if math.isnan(r[k]) else f"{r[k]:.3f}" for k, _ in columns))
    return table


def eval_command(
    data: DataOpt,
    method: Annotated[list[str], typer.Option("--method", help="Repeat for several: ke, ke-loop, ft-layer, ft-all, zhu; NAME+shrink is NAME with its delta shrunk (editor.shrink).")] = ["ke-loop", "ft-layer"],  # noqa: B006
    limit: LimitOpt = None,
    model: ModelOpt = None,
    config: ConfigOpt = None,
    editor: EditorOpt = None,
    ft_lr: Annotated[float, typer.Option(help="Learning rate of the fine-tuning baselines.")] = 1e-5,
    ft_steps: Annotated[int, typer.Option(help="Max steps of the fine-tuning baselines.")] = 100,
    loop: int = 5,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Also write the rows to this JSON file.")] = None,
    own_answers: Annotated[bool, typer.Option("--own-answers/--gold-answers",
                           help="Originals (the editor's condition) and retain answers from the model's own predictions, or the data's.")] = True,
    answer_style: Annotated[str, typer.Option(help="Fact-table targets taught as the relation's claim (claim), the bare object (bare), or auto: claim for chat models.")] = "auto",
    gold_n: Annotated[Optional[int], typer.Option("--gold", help="Held-out gold pairs answered after every edit for performance deterioration (most of the scoring time; default 50; 0: no deterioration column).")] = None,
    gold_known: Annotated[bool, typer.Option("--gold-known/--gold-any", help="Gold pairs the unedited model answers correctly (deterioration = share of them an edit breaks), or the data's first pairs whatever the model says (the paper's ratio).")] = True,
    resume: Annotated[bool, typer.Option("--resume", help="Carry on the run saved in --json (same settings) from the record it reached; a missing or empty file starts afresh.")] = False,
    sequential: Annotated[bool, typer.Option("--sequential", help="Stack each method's edits one after another, as the daemon does, and score the end state against the unedited model (edits kept, retain, deterioration).")] = False,
    state_dir: Annotated[Optional[Path], typer.Option("--state-dir", help="(--sequential) Keep every applied delta and per-edit result here, one folder per method; a rerun carries on from the last edit.")] = None,
    checkpoints: Annotated[str, typer.Option(help="(--sequential) Also score the stack after these many edits (a curve in --json).")] = "10,25,50,100,250,500",
    consolidate_every: Annotated[int, typer.Option(help="(--sequential) Every N edits, put the base weights back and write all facts so far at once (memit, alphaedit); 0: never.")] = 0,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="(--sequential) Also draw the stack's curves (kept, paraphrases, retain, deterioration vs edits; one line per method) to this PNG.")] = None,
    option: Annotated[list[str], typer.Option("--option", help="METHOD:KEY=VALUE, an option of one --method (repeatable; VALUE read as JSON where it can be, e.g. gated:v_steps=40, alphaedit:layers=[4,5]).")] = [],  # noqa: B006
) -> None:
    """The paper's Table 1 columns for every --method on the same edits, in one run (or, --sequential, the edits stacked)."""
    from editor.data import ground, load_records
    from editor.evaluate import GOLD, evaluate, evaluate_sequential, known_gold

    gold_n = GOLD if gold_n is None else gold_n
    if gold_n < 0:
        raise BadInput(f"--gold {gold_n}: must be 0 or more")
    if resume and not json_out:
        raise BadInput("--resume needs --json FILE, the run to carry on")
    if resume and sequential:
        raise BadInput("--resume carries on a run of single edits; a --sequential run carries on from --state-dir")
    if not sequential and (state_dir or consolidate_every or plot):
        raise BadInput("--state-dir, --consolidate-every and --plot are options of --sequential runs")
    if plot is not None and plot.suffix.lower() != ".png":
        raise BadInput(f"--plot {plot}: the curves are written as PNG; give a file ending in .png")
    if consolidate_every < 0:
        raise BadInput(f"--consolidate-every {consolidate_every}: must be 0 (never) or more")
    try:
        marks = tuple(int(c) for c in checkpoints.split(",") if c.strip())
    except ValueError:
        raise BadInput(f"--checkpoints {checkpoints!r}: a comma-separated list of edit counts") from None
    earlier = _saved_run(Path(json_out)) if resume and json_out else None
    extra = parse_method_options(option, method)

    if json_out:  # fail now, not after the first method of a run of hours
        try:
            Path(json_out).parent.mkdir(parents=True, exist_ok=True)
            Path(json_out).touch()
        except OSError as e:
            raise BadInput(f"--json {json_out}: cannot write there ({e.strerror})") from None
    settings, adapter = _setup(config, model)
    style = adapter.answer_style(answer_style)
    options = _method_options(settings, adapter, editor, ft_lr, ft_steps, loop)
    for name, given in extra.items():
        options[name] = {**options.get(name, {}), **given}
    run = {"data": data, "model": adapter.name, "limit": limit, "methods": method, "editor": editor, "ft_lr": ft_lr,
           "ft_steps": ft_steps, "loop": loop, "own_answers": own_answers, "answer_style": style, "gold_n": gold_n,
           "gold_known": gold_known, "editor_sha256": _editor_sha256(options["ke"], adapter.name, method),
           "sequential": sequential, "consolidate_every": consolidate_every, "options": extra}
    # (runs saved before a key existed are not held to it)
    if earlier and (differ := [k for k in run if k in earlier["run"] and earlier["run"][k] != run[k]]):
        raise BadInput(f"--resume: {json_out} is a run with other settings ({', '.join(differ)}); drop --resume to start afresh")
    records = load_records(data, limit, answer_style=style)
    # Deterioration is measured on the data's gold answers (before grounding replaces them with the
    # model's); known ones are searched for beyond --limit, since a small model knows few.
    if earlier:
        gold = [(p, a) for p, a in earlier["gold_pairs"]]
    elif gold_known and gold_n:
        with console.status(f"finding {gold_n} gold pairs the model answers correctly"):
            pool = load_records(data, None, answer_style=style)
            gold = known_gold(adapter, [pair for r in pool for pair in r.retain], gold_n,
                              pool[0].question if pool else True)
    else:
        gold = [pair for r in records for pair in r.retain][:gold_n]
    if own_answers:
        with console.status(f"asking the model for its own answers ({len(records)} records)"):
            records = ground(adapter, records)

    from editor.methods import MethodContext
    from kbsync.served import model_fingerprint

    # Statistics (memit, alphaedit, +preserve) are cached per base model, as the daemon's are.
    context = MethodContext(settings.store.data_path, settings.store.cache_path, model_fingerprint(adapter.model))

    def save(rows: list[dict], state: dict) -> None:  # after every record: a run of hours can stop any time
        if json_out:  # (its folder was made up front); rows' "n" is the records done so far
            tmp = Path(json_out + ".tmp")
            tmp.write_text(json.dumps({"data": data, "model": adapter.name, "n": len(records), "gold": len(gold),
                                       "gold_known": gold_known, "methods": method, "rows": rows, "run": run,
                                       "gold_pairs": gold, "state": state}))
            os.replace(tmp, json_out)  # a run killed mid-write still has the previous record's state

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console) as bar:
        done = earlier["state"]["scores"][0]["n"] if earlier else 0
        tasks = {m: bar.add_task(m, total=len(records), completed=done) for m in method}
        progress = lambda m, i: bar.update(tasks[m], completed=i + 1)  # noqa: E731
        if sequential:
            rows = evaluate_sequential(adapter, records, method, options, gold=gold, on_edit=progress, context=context,
                                       checkpoints=marks, state_dir=state_dir, consolidate_every=consolidate_every)
            save(rows, {})
        else:
            rows = evaluate(adapter, records, method, options, gold=gold, on_edit=progress, on_row=save,
                            resume=earlier["state"] if earlier else None, context=context)
    if sequential:
        console.print(results_table(rows, f"{len(records)} edits from {data} stacked on {adapter.name}", SEQUENTIAL_COLUMNS))
        if plot is not None:
            from editor.curves import plot_curves

            console.print(f"curves: {plot_curves(rows, plot, f'{len(records)} edits from {data} stacked on {adapter.name}')}")
        console.print(f"retain over {rows[0]['retain_n'] if rows else 0} prompts no record edits; kept = the edited "
                      "prompt still answers its target after the last edit.")
    else:
        console.print(results_table(rows, f"{len(records)} edits from {data} on {adapter.name}"))
    console.print("EM = kbsync match rules on the greedy answer; TF tok = token accuracy under teacher forcing.")
    gold_used = rows[0]["gold_n"] if sequential and rows else len(gold)  # (less the prompts edited)
    console.print(f"perf. det. over {gold_used} gold pairs" + (" the unedited model answers correctly." if gold_known else "."))


def _editor_sha256(ke_options: dict, model_name: str, methods: list[str]) -> str | None:
    """The checkpoint's digest when a KE method is evaluated, so --resume notices an editor retrained in place."""
    from editor.delta import sha256_file
    from editor.ke import checkpoint_path

    if not any(m.startswith("ke") for m in methods):
        return None
    path = checkpoint_path(ke_options, model_name)
    return sha256_file(path) if path is not None and path.is_file() else None


def _saved_run(path: Path) -> dict | None:
    """The run an earlier `kbsync eval --json PATH` saved, or None when there is none yet."""
    if not path.exists() or not path.read_text().strip():
        return None
    try:
        saved = json.loads(path.read_text())
        if not saved["state"]["scores"] or not isinstance(saved["run"], dict) or not isinstance(saved["gold_pairs"], list):
            raise KeyError("scores")
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise BadInput(f"--resume: {path} is not a run kbsync eval saved ({type(e).__name__}: {e})") from None
    return saved


@editor_app.command("stats")
def stats(
    method: Annotated[Optional[str], typer.Option("--method", help="Method whose statistics to compute (default: [editor] method).")] = None,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Recompute files that exist (and verify).")] = False,
    model: ModelOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Compute (or verify) the covariance statistics a locate-and-edit method or preserve needs, for the served base model."""
    from editor.methods import MethodContext, make_method
    from kbsync.pipeline import method_options
    from kbsync.served import model_fingerprint

    settings, adapter = _setup(config, model)
    ed = settings.editor
    name = method or ed.method
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("statistics", total=None)
        context = MethodContext(settings.store.data_path, settings.store.cache_path, model_fingerprint(adapter.model),
                                progress=lambda done, total: bar.update(task, completed=done, total=total),
                                rebuild=rebuild)
        made = make_method(name, adapter, context, {"loop": ed.loop, "shrink": ed.shrink, "preserve": ed.preserve},
                           **method_options(ed.options, name))
    covs = getattr(made, "cov", None) or (made._preserver.projectors if made._preserver else None)
    if not covs:
        raise BadInput(f"method {name} keeps no statistics (memit, alphaedit and preserve = \"nullspace\" do)")
    where = settings.store.cache_path / "stats" / context.base_fingerprint
    console.print(esc(f"statistics for {len(covs)} matrices of {adapter.name} in {where}"))
    dims = made.null_dims() if hasattr(made, "null_dims") else {}
    for module in covs:
        console.print(esc(f"  {module}" + (f": null space {dims[module]} of {covs[module].shape[0]} dims" if module in dims else "")))


@editor_app.command("figure")
def figure(
    data: DataOpt = "facts",
    out: Annotated[str, typer.Option(help="PNG path.")] = "figure4.png",
    method: Annotated[list[str], typer.Option("--method")] = ["ke", "ft-all"],  # noqa: B006
    limit: int = 20,
    model: ModelOpt = None,
    config: ConfigOpt = None,
    editor: EditorOpt = None,
    ft_lr: float = 1e-5,
) -> None:
    """Render paper Figure 4 (mean normalised update magnitude per matrix and layer) as a PNG."""
    from editor.analysis import plot_magnitudes, update_magnitudes
    from editor.data import load_records

    settings, adapter = _setup(config, model)
    records = load_records(data, limit)
    options = _method_options(settings, adapter, editor, ft_lr, 100, 5)
    mags = update_magnitudes(adapter, records, method, options)
    console.print(f"wrote {esc(plot_magnitudes(mags, adapter, out))}")
    if any(m.startswith("ke") for m in method):
        from editor.analysis import update_parts
        from editor.methods import make_method

        parts = update_parts(make_method("ke", adapter, **options["ke"]).net, adapter, records)
        console.print(f"KnowledgeEditor update over {len(records)} edits: gradient term |dW| {parts['gradient_term']:.3g}, "
                      f"beta_hat term |dW| {parts['beta_term']:.3g}, beta_hat spread across edits {parts['beta_spread']:.3g} "
                      f"(near 0: a fixed shift every edit carries), head output spread {parts['head_spread']:.3g} "
                      "(near 0: the condition text has no say)")


def register(app: typer.Typer) -> None:
    """Add `editor` (train, stats, figure) and `eval`."""
    app.add_typer(editor_app, name="editor")
    app.command("eval")(eval_command)


if __name__ == "__main__":  # `python -m kbsync.commands.editor train ...`: these commands without the KB client's imports
    editor_app()
