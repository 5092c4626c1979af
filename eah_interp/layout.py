"""Token layout: which key positions of each batch row are image tokens, which are padding, which generated.

`TokenLayout.group_mask` names the position groups every analysis takes (patching sites, intervention
key spans and query rows, statistics over rows): see `GROUPS` and docs/concepts.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from eah_interp.errors import LayoutError, NoImageTokensError

#: Named position groups of `TokenLayout.group_mask`. Per row, over real (non-padding) positions only:
#: ``"system"`` the prompt before the first image token; ``"image"`` the image tokens; ``"question"`` the
#: prompt's non-image positions after the first image token, the last prompt position excluded;
#: ``"last"`` the last real prompt position; ``"generated"`` positions appended by `TokenLayout.extend`;
#: ``"text"`` every real non-image position except ``"last"`` (= system + question + generated: the
#: meaning `patching` gave "text" before the groups existed); ``"all"`` every real position.
#: system, image, question, last and generated partition the real positions of a row with an image.
GROUPS = ("system", "image", "question", "last", "generated", "text", "all")


@dataclass(frozen=True)
class TokenLayout:
    """Image and padding positions of a batch of token sequences.

    Positions are absolute key positions ``0 .. seq - 1`` of each row, padding included (so a
    left-padded row has its image tokens shifted right by its padding length).

    Attributes:
        image_mask: ``Bool[batch, seq]``, True where the token is an image (or visual-query) token.
        attention_mask: ``Bool[batch, seq]``, True where the token is real (not padding).
        prompt_len: how many leading positions are the prompt (later ones were generated); None: all
            ``seq`` positions are the prompt. `extend` sets it.
    """

    image_mask: Bool[Tensor, "batch seq"]
    attention_mask: Bool[Tensor, "batch seq"]
    prompt_len: int | None = None

    def __post_init__(self) -> None:
        if self.image_mask.ndim != 2 or self.attention_mask.shape != self.image_mask.shape:
            raise LayoutError(
                "TokenLayout needs image_mask and attention_mask of the same shape [batch, seq]; got "
                f"{tuple(self.image_mask.shape)} and {tuple(self.attention_mask.shape)}."
            )
        if self.image_mask.dtype != torch.bool or self.attention_mask.dtype != torch.bool:
            raise LayoutError("TokenLayout masks must be torch.bool tensors.")
        if bool((self.image_mask & ~self.attention_mask).any()):
            raise LayoutError("An image token sits on a padding position (attention_mask is 0 there).")
        if self.prompt_len is not None:
            if isinstance(self.prompt_len, bool) or not isinstance(self.prompt_len, int):
                raise LayoutError(f"TokenLayout.prompt_len must be an int or None; got {self.prompt_len!r}.")
            if not 0 < self.prompt_len <= self.image_mask.shape[1]:
                raise LayoutError(
                    f"TokenLayout.prompt_len={self.prompt_len} is not in 1..{self.image_mask.shape[1]} (the sequence length)."
                )
            if bool(self.image_mask[:, self.prompt_len:].any()):
                raise LayoutError("An image token sits after the prompt (at a generated position >= prompt_len).")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_input_ids(
        cls,
        input_ids: Int[Tensor, "batch seq"],
        image_token_id: int | Sequence[int],
        attention_mask: Int[Tensor, "batch seq"] | None = None,
        *,
        require_images: bool = True,
    ) -> TokenLayout:
        """Layout from token ids: image tokens are those equal to ``image_token_id`` (one id or several).

        Args:
            input_ids: ``Int[batch, seq]`` token ids with the image placeholders expanded (HF LLaVA style).
            image_token_id: the placeholder id(s), e.g. ``model.config.image_token_id``.
            attention_mask: ``Int[batch, seq]`` (1 = real token) or None for no padding.
            require_images: raise `NoImageTokensError` if a row has no image token.

        Returns:
            The layout of the batch.
        """
        if input_ids.ndim != 2:
            raise LayoutError(f"input_ids must be [batch, seq]; got shape {tuple(input_ids.shape)}.")
        ids = torch.as_tensor([image_token_id] if isinstance(image_token_id, int) else list(image_token_id), dtype=torch.long)
        image_mask = torch.isin(input_ids, ids.to(input_ids.device))
        if attention_mask is None:
            mask = torch.ones_like(input_ids, dtype=torch.bool)
        else:
            if attention_mask.shape != input_ids.shape:
                raise LayoutError(
                    f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids shape "
                    f"{tuple(input_ids.shape)}."
                )
            mask = attention_mask.bool()
        image_mask = image_mask & mask
        layout = cls(image_mask, mask)
        if require_images:
            layout.check_has_images(f"token id {image_token_id}")
        return layout

    @classmethod
    def from_spans(
        cls,
        spans: Sequence[tuple[int, int] | Sequence[tuple[int, int]]],
        seq_len: int,
        attention_mask: Int[Tensor, "batch seq"] | None = None,
    ) -> TokenLayout:
        """Layout from explicit image spans ``[start, end)``, one span (or a list of spans) per row.

        Example: LLaVA-1.5's image span in its usual prompt (BOS + 34 system tokens) is
        ``from_spans([(35, 611)], seq_len)``, on which the official sink normaliser scores keys 36..610
        with ``d(j) = 647 - j`` (the official code's hard-coded window ``[36, 611)``).
        """
        batch = len(spans)
        image_mask = torch.zeros(batch, seq_len, dtype=torch.bool)
        for row, row_spans in enumerate(spans):
            if len(row_spans) == 2 and all(isinstance(x, int) for x in row_spans):
                row_spans = [row_spans]  # type: ignore[list-item]
            for start, end in row_spans:  # type: ignore[misc]
                if not 0 <= start < end <= seq_len:
                    raise LayoutError(f"Image span [{start}, {end}) of row {row} is not inside [0, {seq_len}).")
                image_mask[row, start:end] = True
        mask = torch.ones_like(image_mask) if attention_mask is None else attention_mask.bool().cpu()
        return cls(image_mask.to(mask.device), mask)

    # ------------------------------------------------------------------ properties
    @property
    def batch_size(self) -> int:
        return self.image_mask.shape[0]

    @property
    def seq_len(self) -> int:
        return self.image_mask.shape[1]

    @property
    def n_prompt(self) -> int:
        """Number of prompt positions (``prompt_len``, or ``seq_len`` when nothing was generated)."""
        return self.seq_len if self.prompt_len is None else self.prompt_len

    @property
    def n_image_tokens(self) -> Int[Tensor, " batch"]:
        """Number of image tokens per row."""
        return self.image_mask.sum(-1)

    def image_positions(self, row: int) -> Int[Tensor, " n_image"]:
        """Absolute positions of the image tokens of one row."""
        return self.image_mask[row].nonzero().flatten()

    def image_extent(self) -> tuple[Int[Tensor, " batch"], Int[Tensor, " batch"]]:
        """First image position and last image position + 1 of each row (``(0, 0)`` for a row without images)."""
        pos = torch.arange(self.seq_len, device=self.image_mask.device)
        has = self.image_mask.any(-1)
        start = torch.where(self.image_mask, pos, self.seq_len).min(-1).values
        end = torch.where(self.image_mask, pos + 1, 0).max(-1).values
        return torch.where(has, start, 0), torch.where(has, end, 0)

    def first_real_position(self) -> Int[Tensor, " batch"]:
        """Index of the first real (non-padding) token of each row: the left-padding length."""
        pos = torch.arange(self.seq_len, device=self.attention_mask.device)
        return torch.where(self.attention_mask, pos, self.seq_len).min(-1).values

    # ------------------------------------------------------------------ transforms
    def check_has_images(self, what: str = "the image token") -> None:
        """Raise `NoImageTokensError` naming the rows that have no image token."""
        empty = (~self.image_mask.any(-1)).nonzero().flatten().tolist()
        if empty:
            raise NoImageTokensError(
                f"Batch row(s) {empty} contain no image tokens ({what}). EAH finds vision sinks among image "
                "tokens: pass a prompt with an image (the processor expands the image placeholder), or build "
                "the layout with TokenLayout.from_spans(...) if your model marks images differently."
            )

    def extend(self, n_new: int, attention_mask: Bool[Tensor, "batch seq_new"] | None = None) -> TokenLayout:
        """Layout after appending ``n_new`` generated (non-image) tokens to every row.

        Args:
            n_new: number of appended positions.
            attention_mask: the full ``[batch, seq + n_new]`` mask if it is known (else new tokens are real).
        """
        new_image = torch.zeros(self.batch_size, n_new, dtype=torch.bool, device=self.image_mask.device)
        image_mask = torch.cat([self.image_mask, new_image], dim=1)
        if attention_mask is None:
            mask = torch.cat([self.attention_mask, ~new_image], dim=1)
        else:
            if attention_mask.shape != image_mask.shape:
                raise LayoutError(
                    f"attention_mask of shape {tuple(attention_mask.shape)} does not fit the extended layout "
                    f"{tuple(image_mask.shape)}."
                )
            mask = attention_mask.to(self.attention_mask.device).bool()
        return TokenLayout(image_mask, mask, self.n_prompt)

    def fit(self, batch: int, q_len: int, k_len: int) -> TokenLayout:
        """This prompt layout fitted to an attention call of ``batch`` rows, ``q_len`` queries, ``k_len`` keys.

        Rows are repeated in place when the call has a multiple of the layout's rows (``generate``
        expands rows for beams); on a decode step (``q_len < k_len``) the generated positions are
        appended as text. A prompt forward (``q_len == k_len``) must fit exactly: a layout is never
        silently stretched over a prompt it does not describe.

        Raises:
            LayoutError: the layout does not fit the call.
        """
        layout = self
        if layout.batch_size != batch and batch % layout.batch_size == 0:
            layout = layout.repeat_interleave(batch // layout.batch_size)
        if q_len < k_len and layout.seq_len < k_len:
            layout = layout.extend(k_len - layout.seq_len)
        if layout.batch_size != batch or layout.seq_len != k_len:
            raise LayoutError(
                f"The layout ({layout.batch_size} rows x {layout.seq_len} positions) does not fit the attention "
                f"call ({batch} rows x {k_len} key positions). Build it from the same input_ids (or pass the "
                "layout of the rows this call sees)."
            )
        return layout

    def select(self, rows: Sequence[int] | Tensor) -> TokenLayout:
        """Layout of a subset (or a reordering / repetition) of the batch rows."""
        index = torch.as_tensor(rows, device=self.image_mask.device, dtype=torch.long)
        return TokenLayout(self.image_mask[index], self.attention_mask[index], self.prompt_len)

    def repeat_interleave(self, repeats: int) -> TokenLayout:
        """Each row repeated ``repeats`` times in place (as `generate` expands rows for beams)."""
        return TokenLayout(
            self.image_mask.repeat_interleave(repeats, 0), self.attention_mask.repeat_interleave(repeats, 0),
            self.prompt_len,
        )

    def to(self, device: torch.device | str) -> TokenLayout:
        return TokenLayout(self.image_mask.to(device), self.attention_mask.to(device), self.prompt_len)

    # ------------------------------------------------------------------ position groups
    def last_prompt_position(self) -> Int[Tensor, " batch"]:
        """Index of the last real prompt position of each row (-1 for a row with no real prompt token)."""
        pos = torch.arange(self.seq_len, device=self.attention_mask.device)
        real_prompt = self.attention_mask & (pos < self.n_prompt)
        return torch.where(real_prompt, pos, -1).max(-1).values

    def group_mask(self, group: str | Bool[Tensor, "batch seq"]) -> Bool[Tensor, "batch seq"]:
        """The positions of each row in a named group (see `GROUPS`) or in a user mask.

        Named groups hold real positions only (padding is in no group) and may be empty in a row
        (e.g. "system" when the prompt starts with the image, "generated" before `extend`). A row
        without image tokens has no "system": its prompt text (except "last") is all "question".

        Args:
            group: a name of `GROUPS`, or a user ``Bool[batch, seq]`` mask over this layout's
                positions; a mask must select at least one position per row, real positions only.

        Returns:
            ``Bool[batch, seq]`` on the layout's device.

        Raises:
            LayoutError: an unknown name, or a mask of the wrong shape or dtype, empty in a row, or
                selecting padding.

        Example:
            A row ``[pad, sys, img, img, q, q, last]`` has system ``[1]``, image ``[2, 3]``, question
            ``[4, 5]``, last ``[6]``.
        """
        if isinstance(group, Tensor):
            return self._check_mask(group)
        if not isinstance(group, str) or group not in GROUPS:
            raise LayoutError(
                f"Unknown position group {group!r}: pass one of {GROUPS} or a Bool[batch, seq] mask of shape "
                f"({self.batch_size}, {self.seq_len})."
            )
        real = self.attention_mask
        pos = torch.arange(self.seq_len, device=real.device)[None, :]
        prompt = real & (pos < self.n_prompt)
        if group == "all":
            return real.clone()
        if group == "image":
            return self.image_mask.clone()
        if group == "generated":
            return real & ~prompt
        last = torch.zeros_like(real)
        rows = torch.arange(self.batch_size, device=real.device)
        index = self.last_prompt_position()
        last[rows[index >= 0], index[index >= 0]] = True
        if group == "last":
            return last
        if group == "text":
            return real & ~self.image_mask & ~last
        start, _ = self.image_extent()
        has_image = self.image_mask.any(-1, keepdim=True)
        before_image = (pos < start[:, None]) & has_image
        if group == "system":
            return prompt & before_image
        return prompt & ~before_image & ~self.image_mask & ~last  # "question"

    def _check_mask(self, mask: Tensor) -> Bool[Tensor, "batch seq"]:
        """A user position mask, validated against this layout."""
        if tuple(mask.shape) != (self.batch_size, self.seq_len):
            raise LayoutError(
                f"A position mask must have the layout's shape (batch, seq) = ({self.batch_size}, {self.seq_len}); "
                f"got {tuple(mask.shape)}."
            )
        if mask.dtype != torch.bool:
            raise LayoutError(f"A position mask must be a torch.bool tensor; got {mask.dtype} (use mask.bool()).")
        mask = mask.to(self.attention_mask.device)
        if bool((mask & ~self.attention_mask).any()):
            rows = (mask & ~self.attention_mask).any(-1).nonzero().flatten().tolist()
            raise LayoutError(
                f"The position mask selects padding in row(s) {rows}: select real positions only "
                "(mask & layout.attention_mask)."
            )
        empty = (~mask.any(-1)).nonzero().flatten().tolist()
        if empty:
            raise LayoutError(f"The position mask selects no position in row(s) {empty}: every row needs at least one.")
        return mask

    def describe(self) -> str:
        """One line per row: length, padding, image-token count and spans."""
        lines = []
        for row in range(self.batch_size):
            pos = self.image_positions(row).tolist()
            spans: list[tuple[int, int]] = []
            for p in pos:
                if spans and spans[-1][1] == p:
                    spans[-1] = (spans[-1][0], p + 1)
                else:
                    spans.append((p, p + 1))
            n_pad = int((~self.attention_mask[row]).sum())
            span_text = ", ".join(f"[{s}, {e})" for s, e in spans) or "none"
            lines.append(
                f"row {row}: {self.seq_len} positions, {n_pad} padding, {len(pos)} image tokens at {span_text}"
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        counts = self.n_image_tokens.tolist()
        return f"TokenLayout(batch={self.batch_size}, seq={self.seq_len}, image_tokens_per_row={counts})"
