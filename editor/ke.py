"""KnowledgeEditor as an edit method: load the trained hyper-network for this model and apply it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from editor.methods import EditMethod, EditRequest, EditResult, MethodOptions, register_method
from kbsync.errors import NotFound


@dataclass
class KEOptions(MethodOptions):
    """The editor file (empty: the model's editor under the data directory) and +loop's budget."""

    checkpoint: str = ""
    loop: int = 5


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
    options_cls: ClassVar[type[MethodOptions]] = KEOptions

    def prepare(self) -> None:
        """Load the trained hyper-network once (a 57 MB file on SmolLM2), not per edit."""
        path = checkpoint_path({"checkpoint": self.options.checkpoint, "data_dir": self.context.data_dir},
                               self.adapter.name)
        if path is None or not path.exists():
            raise NotFound(
                f"no trained KnowledgeEditor for model {self.adapter.name}"
                + (f" (looked for {path})" if path else "")
                + "; train one with `kbsync editor train` or edit with --method alphaedit"
            )
        from editor.hypernet import load_editor

        self.net = load_editor(path, self.adapter)
        super().prepare()

    def edit(self, request: EditRequest) -> EditResult:
        """Predict the delta; the +loop variant re-applies it (up to the `loop` option) until the answer flips."""
        from editor.hypernet import apply_editor

        loops = self.options.loop if self.loops > 1 else 1
        return apply_editor(self, request, loops=loops)


@register_method
class KnowledgeEditorLoop(KnowledgeEditorMethod):
    """KnowledgeEditor "+loop": re-apply up to k times (default 5) until the prediction flips."""

    name: ClassVar[str] = "ke-loop"
    description: ClassVar[str] = "KnowledgeEditor re-applied until the prediction flips"
    loops: ClassVar[int] = 5
