"""The edit vocabulary shared by the API, the domain's presets and the GPU worker's ops."""

from __future__ import annotations

import re
from typing import Literal, get_args

Action = Literal["recolor", "tone", "texture", "remove"]
ACTIONS: tuple[Action, ...] = get_args(Action)
TONES = ("warm", "cool", "bright", "dark", "vivid", "muted")
TEXTURES = ("wood", "marble", "concrete", "linen", "brick", "terrazzo")
HEX_COLOUR = re.compile(r"#[0-9a-fA-F]{6}")  # a recolor's value, matched in full
