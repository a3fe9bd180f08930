"""Shared-prefix forwards: a prompt encoded once, its keys/values shared by every row continuing it.

All rows scored or trained on one prompt begin with it: the G student rows (prompt + response)
and every teacher row (prompt + hint + response). Instead of re-encoding the prompt (and the image,
through the vision tower) in each row, `encode_prefix` runs it once and keeps every layer's keys
and values; `continuation_hidden` then runs all continuations as one right-padded batch against
that cache. Each continuation attends to the whole prefix and to its own earlier tokens only: the
prefix has no padding and continuations are right-padded, so the model's ordinary 2-D padding mask
plus causality is exactly that mask, in whatever attention implementation the model was loaded
with. Positions continue the prefix's: plain ``Lp + j`` for text models; for Qwen3-VL the text row
``Lp + j`` and the three mRoPE rows from one past the prefix's largest position (rope deltas).

The outputs equal the unshared path (`cepo.models.response_hidden` on ``[prompt | continuation]``
rows) up to float rounding, and so do gradients: the cached keys/values stay in the autograd graph
and are only expanded (a view) to the batch, so a backward through all continuations accumulates
the prefix's gradient once. A model or setting this does not cover is reported by
`prefix_sharing_unsupported` (the caller falls back to the unshared path).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer

from cepo.batch import ModelInputs, Prefix, collate
from cepo.models import position_ids, unwrap_model

logger = logging.getLogger("cepo.prefix")
_LOGGED: set[str] = set()
SETTINGS = ("auto", "true", "false")
# Decoder families whose base model takes a cache, a 2-D padding mask and explicit position ids,
# with every layer attending fully (no sliding windows), as checked by the tests.
TEXT_MODEL_TYPES = ("qwen3", "qwen2", "llama")
VL_MODEL_TYPES = ("qwen3_vl",)
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")
# transformers lets a checkpointed layer keep its cache only where a layer says so (5.2x on)
_CHECKPOINT_CAN_KEEP_CACHE = hasattr(GradientCheckpointingLayer, "_can_checkpoint_with_cache")


class PrefixSharingUnsupported(NotImplementedError):
    """The model or setting cannot share prefixes; the caller should take the unshared path."""


# --------------------------------------------------------------------------- support


def prefix_sharing_unsupported(model: torch.nn.Module, *, grad: bool = False) -> str | None:
    """Why `model` cannot share prefixes (with gradients when `grad`), or None if it can."""
    base = unwrap_model(model)
    config = getattr(base, "config", None)
    inner = getattr(base, "model", None)
    if config is None or inner is None:
        return f"{type(base).__name__} has no config or inner .model"
    model_type = getattr(config, "model_type", None)
    known = TEXT_MODEL_TYPES + VL_MODEL_TYPES
    if model_type not in known:
        return f"model type {model_type!r} is not one of {', '.join(known)}"
    if _cache_kwarg(inner) is None:
        return f"{type(inner).__name__}.forward takes no cache"
    text = config.get_text_config(decoder=True)
    layer_types = getattr(text, "layer_types", None) or []
    sliding = getattr(text, "use_sliding_window", False)
    if sliding or any(t != "full_attention" for t in layer_types):
        return "the model has sliding-window or other non-full attention layers"
    attn = getattr(text, "_attn_implementation", None) or config._attn_implementation
    if attn not in ATTENTION_IMPLEMENTATIONS:
        return (f"attention implementation {attn!r} is not one of "
                f"{', '.join(ATTENTION_IMPLEMENTATIONS)}")
    if grad:
        return _checkpointing_unsupported(base)
    return None


def _checkpointed_layers(base: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in base.modules()
            if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]


def _checkpointing_unsupported(base: torch.nn.Module) -> str | None:
    """Gradient checkpointing works with shared prefixes only when the cache survives into the
    checkpointed layers and gradients reach tensors that are not layer arguments (non-reentrant)."""
    layers = _checkpointed_layers(base)
    if not layers:
        return None
    if not _CHECKPOINT_CAN_KEEP_CACHE:
        return "this transformers version drops the KV cache in gradient-checkpointed layers"
    func = getattr(layers[0], "_gradient_checkpointing_func", None)
    if getattr(func, "keywords", {}).get("use_reentrant", True) is not False:
        return ("reentrant gradient checkpointing passes no gradient through the shared cache "
                "(enable it with use_reentrant=False)")
    return None


@contextmanager
def _cache_through_checkpoints(model: torch.nn.Module) -> Iterator[None]:
    """Let gradient-checkpointed layers keep the cache for this forward. Safe here because the
    caches of this module never grow: a layer recomputed in backward reads and returns exactly
    what it did in forward."""
    layers = [m for m in _checkpointed_layers(unwrap_model(model))
              if "_can_checkpoint_with_cache" not in vars(m)]
    for m in layers:
        m._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for m in layers:
            del m._can_checkpoint_with_cache


def supports_prefix_sharing(model: torch.nn.Module, *, grad: bool = False) -> bool:
    return prefix_sharing_unsupported(model, grad=grad) is None


def resolve_prefix_sharing(setting: str, model: torch.nn.Module, *, grad: bool = False,
                           sharded: bool = False) -> tuple[bool, str]:
    """The ``--prefix_sharing`` switch: (use it?, one line saying which path and why).

    ``auto`` shares where supported and falls back otherwise (and keeps an FSDP-`sharded` update
    unshared: that path is checked in one process only); ``true`` raises
    `PrefixSharingUnsupported` where unsupported; ``false`` never shares.
    """
    setting = str(setting).lower()
    if setting not in SETTINGS:
        raise ValueError(f"prefix_sharing must be one of {', '.join(SETTINGS)}, got {setting!r}")
    phase = "update" if grad else "scoring"
    if setting == "false":
        return False, f"prefix sharing ({phase}): off (prefix_sharing=false)"
    if setting == "auto" and grad and sharded:
        return False, (f"prefix sharing ({phase}): off (auto, sharding=fsdp: shared prefixes are "
                       "checked in one process only; --prefix_sharing true turns them on)")
    why = prefix_sharing_unsupported(model, grad=grad)
    if why is None:
        return True, f"prefix sharing ({phase}): on, each prompt encoded once per group"
    if setting == "true":
        raise PrefixSharingUnsupported(f"prefix_sharing=true but {why}; use auto or false")
    return False, f"prefix sharing ({phase}): off, unshared fallback ({why})"


def use_prefix_sharing(setting: str, model: torch.nn.Module, *, grad: bool = False,
                       sharded: bool = False) -> bool:
    """`resolve_prefix_sharing`, its one line logged the first time it is seen in this process."""
    use, line = resolve_prefix_sharing(setting, model, grad=grad, sharded=sharded)
    if line not in _LOGGED:
        _LOGGED.add(line)
        logger.info(line)
    return use


def _cache_kwarg(inner: torch.nn.Module) -> str | None:
    """The name the inner model's forward takes the cache by (transformers renamed it)."""
    params = inspect.signature(inner.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return None


def _is_vision_language(model: torch.nn.Module) -> bool:
    return hasattr(unwrap_model(model).model, "get_rope_index")


# --------------------------------------------------------------------------- the prefix


@dataclass
class EncodedPrefix:
    """One prompt run through the model: what its continuations need (in the autograd graph when
    it was encoded with gradients)."""

    keys: list[torch.Tensor]  # per layer [1, kv_heads, Lp, head_dim]
    values: list[torch.Tensor]  # per layer [1, kv_heads, Lp, head_dim]
    last_hidden: torch.Tensor  # [1, D]: the final hidden state of the last prompt token
    length: int  # Lp
    rope_start: int | None  # VL: first mRoPE position after the prompt; None for text models


def _one_row(model: torch.nn.Module, prefix: Prefix | ModelInputs, device) -> ModelInputs:
    """`prefix` as a one-row batch without padding (left padding of a batch row is removed)."""
    if isinstance(prefix, Prefix):
        if prefix.input_ids.ndim != 1 or prefix.input_ids.numel() == 0:
            raise ValueError(f"the prefix must be a non-empty 1-D token row, got shape "
                             f"{tuple(prefix.input_ids.shape)}")
        return collate([prefix], pad_token_id=0).to(device)
    if not isinstance(prefix, ModelInputs):
        raise TypeError(f"prefix must be a Prefix or a one-row ModelInputs, got "
                        f"{type(prefix).__name__}")
    if prefix.input_ids.ndim != 2 or prefix.input_ids.shape[0] != 1:
        raise ValueError(f"the prefix must be one row, got input_ids of shape "
                         f"{tuple(prefix.input_ids.shape)}")
    mask = prefix.attention_mask[0].bool()
    real = int(mask.sum())
    if real == 0:
        raise ValueError("the prefix row is all padding")
    if not bool(mask[-real:].all()):
        raise ValueError("the prefix row may only be left-padded (its attention mask has a gap "
                         "or right padding)")
    start = mask.numel() - real
    return ModelInputs(
        input_ids=prefix.input_ids[:, start:],
        attention_mask=prefix.attention_mask[:, start:],
        mm_token_type_ids=prefix.mm_token_type_ids[:, start:],
        pixel_values=prefix.pixel_values,
        image_grid_thw=prefix.image_grid_thw,
    ).to(device)


def encode_prefix(model: torch.nn.Module, prefix: Prefix | ModelInputs) -> EncodedPrefix:
    """Run the prompt once (vision tower included) and keep its keys/values and last hidden state.

    Gradients flow through the result when they are enabled: encode once per group, run its
    continuations, and one backward gives the prompt's gradient once.
    """
    why = prefix_sharing_unsupported(model, grad=torch.is_grad_enabled() and model.training)
    if why is not None:
        raise PrefixSharingUnsupported(why)
    base = unwrap_model(model)
    weight = next(base.parameters())
    inputs = _one_row(model, prefix, weight.device)
    length = inputs.input_ids.shape[1]
    cache = Cache(layer_class_to_replicate=_CaptureLayer)
    kwargs = {_cache_kwarg(base.model): cache, "use_cache": True}
    with _cache_through_checkpoints(model):
        out, rope_start = _prefix_forward(model, base, inputs, weight, kwargs)
    layers = [layer for layer in cache.layers if getattr(layer, "keys", None) is not None]
    if len(layers) != len(cache.layers) or not layers:
        raise PrefixSharingUnsupported("the model did not fill a key/value cache for every layer")
    return EncodedPrefix(
        keys=[layer.keys for layer in layers],
        values=[layer.values for layer in layers],
        last_hidden=out.last_hidden_state[:, -1],
        length=length,
        rope_start=rope_start,
    )


def _prefix_forward(model, base, inputs: ModelInputs, weight: torch.Tensor, kwargs: dict):
    """The inner model on the one prompt row; also the first mRoPE position after it (VL)."""
    if _is_vision_language(model):
        pos = position_ids(model, inputs)  # [4, 1, Lp]
        pixels = inputs.pixel_values.to(weight.dtype) if inputs.pixel_values is not None else None
        out = base.model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                         position_ids=pos, pixel_values=pixels,
                         image_grid_thw=inputs.image_grid_thw,
                         mm_token_type_ids=inputs.mm_token_type_ids, **kwargs)
        return out, int(pos[1:].max()) + 1
    if inputs.pixel_values is not None:
        raise ValueError("a text-only model got a prefix with images")
    pos = torch.arange(inputs.input_ids.shape[1], device=weight.device)[None]
    out = base.model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                     position_ids=pos, **kwargs)
    return out, None


class _CaptureLayer(DynamicLayer):
    """Keeps the first keys/values it is given (the whole prompt's) and returns them unchanged,
    so a layer recomputed under gradient checkpointing neither grows nor replaces them."""

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.keys, self.values = key_states, value_states
            self.device = key_states.device
            self.is_initialized = True
        return key_states, value_states


class _SharedPrefixLayer(DynamicLayer):
    """One layer's prefix keys/values, read by a batch of continuations and never grown, so the
    same prefix serves any number of micro-batches (and no in-place write touches the graph)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.keys, self.values = keys, values
        self.device = keys.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        rows = key_states.shape[0]
        keys = torch.cat([self.keys.expand(rows, -1, -1, -1), key_states], dim=-2)
        values = torch.cat([self.values.expand(rows, -1, -1, -1), value_states], dim=-2)
        return keys, values


def context_after(base: Prefix, full: Prefix) -> torch.Tensor:
    """The text tokens [H] that `full` adds after `base` (a teacher hint: ``full =
    base.extend(hint)``), so rows built as whole prefixes can share `base`'s encoding."""
    n = base.input_ids.numel()
    if full.input_ids.numel() < n or not torch.equal(full.input_ids[:n], base.input_ids):
        raise ValueError("the row's context does not begin with the shared prefix's tokens")
    if full.pixel_values is not base.pixel_values and not (
            full.pixel_values is not None and base.pixel_values is not None
            and torch.equal(full.pixel_values, base.pixel_values)):
        raise ValueError("the row's context and the shared prefix have different images")
    if bool(full.mm_token_type_ids[n:].any()):
        raise ValueError("the row's context adds image tokens after the shared prefix")
    return full.input_ids[n:]


# --------------------------------------------------------------------------- continuations


def continuation_hidden(
    model: torch.nn.Module,
    encoded: EncodedPrefix,
    continuations: Sequence[torch.Tensor],
) -> torch.Tensor:
    """Hidden states [B, C, D] predicting each continuation's tokens (C = the longest one).

    ``out[i, j]`` is the final hidden state that predicts token j of continuation i: j = 0 is the
    prompt's last position, j > 0 continuation token j - 1; zeros past a continuation's end.
    """
    lengths = [int(c.numel()) for c in continuations]
    if not continuations:
        raise ValueError("continuation_hidden needs at least one continuation")
    if any(c.ndim != 1 for c in continuations):
        raise ValueError("every continuation must be a 1-D tensor of token ids")
    base = unwrap_model(model)
    device, d = encoded.last_hidden.device, encoded.last_hidden.shape[-1]
    rows, width = len(continuations), max(lengths)
    first = encoded.last_hidden[:, None].expand(rows, 1, d)  # [B, 1, D]
    if width == 0:
        return first.clone()
    ids = torch.zeros(rows, width, dtype=torch.long, device=device)
    mask = torch.zeros(rows, width, dtype=torch.long, device=device)
    for row, c in enumerate(continuations):
        ids[row, : lengths[row]] = c.to(device=device, dtype=torch.long)
        mask[row, : lengths[row]] = 1
    attention = torch.cat([mask.new_ones(rows, encoded.length), mask], dim=1)
    steps = torch.arange(width, device=device)
    text = (encoded.length + steps).expand(rows, width)
    if encoded.rope_start is None:
        pos = text
    else:
        rope = (encoded.rope_start + steps).expand(3, rows, width)
        pos = torch.cat([text[None], rope], dim=0)  # [4, B, C]
    cache = Cache(layers=[_SharedPrefixLayer(k, v) for k, v in zip(encoded.keys, encoded.values)])
    with _cache_through_checkpoints(model):
        out = base.model(input_ids=ids, attention_mask=attention, position_ids=pos,
                         **{_cache_kwarg(base.model): cache}, use_cache=False)
    hidden = torch.cat([first, out.last_hidden_state[:, :-1]], dim=1)  # [B, C, D]
    return torch.where(mask.bool()[..., None], hidden, hidden.new_zeros(()))


def shared_response_hidden(
    model: torch.nn.Module,
    prefix: Prefix | ModelInputs | EncodedPrefix,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    contexts: Sequence[torch.Tensor] | None = None,
    micro_batch_size: int | None = None,
) -> torch.Tensor:
    """Hidden states [B, T, D] predicting the response tokens of B rows sharing one prompt.

    Row i is ``prompt + contexts[i] + response_ids[i]`` (contexts: e.g. teacher hints, default
    none); `response_ids` / `response_mask` are [B, T], right-padded. The result lines up with
    the labels exactly as `cepo.models.response_hidden` does on the unshared rows (zeros at
    padding). The prompt is encoded once (pass an `EncodedPrefix` to reuse one across calls);
    continuations run `micro_batch_size` rows at a time (default: all at once).
    """
    if response_ids.ndim != 2 or response_ids.shape != response_mask.shape:
        raise ValueError(f"response_ids and response_mask must be [B, T] alike, got "
                         f"{tuple(response_ids.shape)} and {tuple(response_mask.shape)}")
    rows, width = response_ids.shape
    contexts = list(contexts) if contexts is not None else [response_ids.new_zeros(0)] * rows
    if len(contexts) != rows:
        raise ValueError(f"{rows} responses but {len(contexts)} contexts")
    mask = response_mask.bool().cpu()
    lengths = mask.sum(1)
    if not bool((mask == (torch.arange(width)[None] < lengths[:, None])).all()):
        raise ValueError("response_mask must be right-padded (ones, then zeros) in every row")
    if micro_batch_size is not None and micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    encoded = prefix if isinstance(prefix, EncodedPrefix) else encode_prefix(model, prefix)
    device = encoded.last_hidden.device
    ids = response_ids.to(device)
    step = micro_batch_size or rows
    parts = []
    for start in range(0, rows, step):
        sub = range(start, min(rows, start + step))
        conts = [torch.cat([contexts[i].to(device=device, dtype=torch.long),
                            ids[i, : int(lengths[i])]]) for i in sub]
        hidden = continuation_hidden(model, encoded, conts)  # [b, C, D]
        offset = torch.tensor([contexts[i].numel() for i in sub], device=device)
        index = offset[:, None] + torch.arange(width, device=device)
        index = index.clamp_max(hidden.shape[1] - 1)
        picked = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))  # [b, T, D]
        valid = mask[list(sub)].to(device)[..., None]
        parts.append(torch.where(valid, picked, picked.new_zeros(())))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def grouped_response_hidden(
    model: torch.nn.Module,
    prompts: Sequence[Prefix | ModelInputs],
    group: Sequence[int],
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    contexts: Sequence[torch.Tensor] | None = None,
    micro_batch_size: int | None = None,
    encoded: dict[int, EncodedPrefix] | None = None,
) -> torch.Tensor:
    """`shared_response_hidden` for rows of several prompts: [B, T, D] in row order.

    Row i continues ``prompts[group[i]]`` with ``contexts[i]`` (default none) and its response.
    Each prompt is encoded once; pass a dict as `encoded` to keep the encodings for later calls
    (e.g. the student rows, then the teacher rows of the same micro-batch). Encodings depend on
    the weights: keep one dict per weight set (actor, adapters disabled) and per prompt rendering
    (an image-blind teacher prompt is another prompt).
    """
    rows = response_ids.shape[0]
    if len(group) != rows:
        raise ValueError(f"{rows} responses but {len(group)} group indices")
    if contexts is not None and len(contexts) != rows:
        raise ValueError(f"{rows} responses but {len(contexts)} contexts")
    if any(not 0 <= g < len(prompts) for g in group):
        raise ValueError(f"group indices must be in [0, {len(prompts)}), got {sorted(set(group))}")
    encoded = {} if encoded is None else encoded
    parts, order = [], []
    for g in dict.fromkeys(group):  # prompts in order of first appearance
        sub = [i for i in range(rows) if group[i] == g]
        if g not in encoded:
            encoded[g] = encode_prefix(model, prompts[g])
        index = torch.tensor(sub, device=response_ids.device)
        parts.append(shared_response_hidden(
            model, encoded[g], response_ids[index], response_mask[index],
            contexts=None if contexts is None else [contexts[i] for i in sub],
            micro_batch_size=micro_batch_size))
        order.extend(sub)
    hidden = torch.cat(parts)
    if order == list(range(rows)):
        return hidden
    inverse = torch.empty(rows, dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(rows)
    return hidden[inverse.to(hidden.device)]
