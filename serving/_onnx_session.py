"""The one place serving talks to onnxruntime: session options, checks, the card.

Every problem with the file becomes one UserError line naming the file and the fix.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from serving.card import METADATA_KEY, ModelCard
from common.errors import UserError

log = logging.getLogger(__name__)

REEXPORT = "re-export it with `flexunet export`"


class OnnxSession:
    """A callable onnxruntime session: float32 NHWC batch -> NHWK probabilities.

    Input and output names come from the session (never assumed). Options: graph
    optimisation level ALL, sequential execution, `threads` intra-op threads (None: one
    per core), one inter-op thread (the graph is a chain: parallel branches buy nothing).
    """

    def __init__(self, session: ort.InferenceSession, path: Path):
        self.session, self.path = session, path
        inp, out = session.get_inputs()[0], session.get_outputs()[0]
        self.input_name, self.output_name = inp.name, out.name
        self.input_shape: list[int | str | None] = list(inp.shape)
        self.output_shape: list[int | str | None] = list(out.shape)

    def fixed_dim(self, axis: int) -> int | None:
        """The input's size along `axis` if the model fixes it, else None."""
        dim = self.input_shape[axis]
        return dim if isinstance(dim, int) and dim > 0 else None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        feed = {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)}
        return self.session.run([self.output_name], feed)[0]


def session_options(threads: int | None) -> ort.SessionOptions:
    """threads: intra-op threads, None for one per core (TilingSettings.threads, checked there)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 0 if threads is None else int(threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only: onnxruntime's warnings are not the user's to fix
    return opts


def open_session(path: Path, threads: int | None = None) -> tuple[OnnxSession, ModelCard]:
    """Open and validate an exported FlexUNet; return the session and the card it carries."""
    if not path.is_file():
        raise UserError(f"{path}: model file not found; pass the .onnx file `flexunet export` wrote "
                        f"(models/model.onnx) or an MLflow URI such as models:/<name>@champion")
    opts = session_options(threads)
    try:
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"{path}: not a readable ONNX model ({first}); {REEXPORT}") from None
    wrapped = OnnxSession(session, path)
    card = _read_card(session, path)
    _check_io(wrapped, card, path)
    log.info("loaded %s: %d channel(s) in, %d classes, tile %d, size multiple %d",
             path, card.channels, card.num_classes, card.tile_size, card.size_multiple)
    return wrapped, card


def _read_card(session: ort.InferenceSession, path: Path) -> ModelCard:
    meta = session.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in meta:
        raise UserError(f"{path}: no model card in its ONNX metadata (key {METADATA_KEY!r}), "
                        f"so channels/classes/tile size are unknown; {REEXPORT}")
    try:
        card = ModelCard.from_json(meta[METADATA_KEY])
    except (ValueError, TypeError, KeyError) as exc:
        raise UserError(f"{path}: the model card in its ONNX metadata is unreadable ({exc}); {REEXPORT}") from None
    if card.channels not in (1, 3):
        raise UserError(f"{path}: model card says {card.channels} input channels; only 1 or 3 are supported")
    if not 2 <= card.num_classes <= 256 or card.size_multiple < 1 or card.tile_size < 1:
        raise UserError(f"{path}: model card is inconsistent (num_classes {card.num_classes}, size_multiple "
                        f"{card.size_multiple}, tile_size {card.tile_size}); {REEXPORT}")
    return card


def _check_io(s: OnnxSession, card: ModelCard, path: Path) -> None:
    """The contract: one NHWC input of card.channels, an NHWK output of card.num_classes."""
    if len(s.session.get_inputs()) != 1:
        names = [i.name for i in s.session.get_inputs()]
        raise UserError(f"{path}: model has {len(names)} inputs {names}; expected one image input; {REEXPORT}")
    if len(s.input_shape) != 4:
        raise UserError(f"{path}: input {s.input_name!r} has rank {len(s.input_shape)} {s.input_shape}; "
                        f"expected rank 4 (N, H, W, C); {REEXPORT}")
    channels = s.fixed_dim(3)
    if channels != card.channels:
        hint = " (looks like NCHW)" if s.fixed_dim(1) in (1, 3) and channels is None else ""
        raise UserError(f"{path}: input {s.input_name!r} has shape {s.input_shape}{hint}, but its card says "
                        f"NHWC with {card.channels} channel(s); {REEXPORT}")
    if len(s.output_shape) != 4:
        raise UserError(f"{path}: output {s.output_name!r} has rank {len(s.output_shape)}; "
                        f"expected (N, H, W, K) probabilities; {REEXPORT}")
    k = s.output_shape[3]
    if isinstance(k, int) and k != card.num_classes:
        raise UserError(f"{path}: output has {k} classes but its card says {card.num_classes}; {REEXPORT}")
