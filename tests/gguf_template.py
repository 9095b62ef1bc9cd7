"""A copy of a GGUF with another chat template, written with the `gguf` package's own script.

No small tool-calling model ships on PyPI; the tests give the small default model a template that
renders tools and tool results the way Hermes / Qwen models' templates do, so that the native
path (rendering, parsing the model's `<tool_call>` syntax) runs on a real model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TEMPLATES = Path(__file__).with_name("templates")


def with_chat_template(source: Path, target: Path, template: Path) -> Path:
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(source), str(target),
                    "--chat-template-file", str(template), "--force"], check=True, capture_output=True)
    return target
