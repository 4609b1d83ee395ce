"""KnowledgeEditor as an edit method: load the trained hyper-network for this model and apply it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from editor.methods import EditMethod, EditRequest, EditResult, register_method
from kbsync.errors import NotFound


def editor_dir(data_dir: Path, model_name: str) -> Path:
    """Where the trained hyper-network for a model lives."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(model_name).name or model_name)
    return Path(data_dir) / "editors" / safe


def checkpoint_path(options: dict[str, Any], model_name: str) -> Path | None:
    """The editor file the KE methods load: the `checkpoint` option, else the model's editor dir under `data_dir`."""
    if options.get("checkpoint"):
        return Path(options["checkpoint"])
    return editor_dir(options["data_dir"], model_name) / "editor.safetensors" if options.get("data_dir") else None


@register_method
class KnowledgeEditorMethod(EditMethod):
    """De Cao et al. 2021: a hyper-network predicts the update from the new fact's gradient."""

    name: ClassVar[str] = "ke"
    description: ClassVar[str] = "KnowledgeEditor hyper-network (one application)"
    loops: ClassVar[int] = 1

    def __init__(self, adapter: Any, **options: Any) -> None:
        super().__init__(adapter, **options)
        path = checkpoint_path(options, adapter.name)
        if path is None or not path.exists():
            raise NotFound(
                f"no trained KnowledgeEditor for model {adapter.name}"
                + (f" (looked for {path})" if path else "")
                + "; train one with `kbsync editor train` or edit with --method ft"
            )
        from editor.hypernet import load_editor

        self.net = load_editor(path, adapter)

    def edit(self, request: EditRequest) -> EditResult:
        """Predict the delta; the +loop variant re-applies it (up to the `loop` option) until the answer flips."""
        from editor.hypernet import apply_editor

        loops = int(self.options.get("loop", self.loops)) if self.loops > 1 else 1
        return apply_editor(self, request, loops=loops)


@register_method
class KnowledgeEditorLoop(KnowledgeEditorMethod):
    """KnowledgeEditor "+loop": re-apply up to k times (default 5) until the prediction flips."""

    name: ClassVar[str] = "ke-loop"
    description: ClassVar[str] = "KnowledgeEditor re-applied until the prediction flips"
    loops: ClassVar[int] = 5
