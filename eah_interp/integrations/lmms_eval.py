"""lmms-eval model ``eah``: any lmms-eval task with any intervention spec switched on.

Installed with ``pip install "eah-interp[lmms]"`` plus lmms-eval itself (docs/howto/lmms_eval.md says how on
a CPU and on a GPU machine), the model registers through lmms-eval's entry-point group ``lmms_eval.models``,
so no file of the user's is needed::

    lmms-eval eval --model eah \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,interventions=eah+pai,base=llava_hf \\
        --tasks pope_random --log_samples --output_path runs/lmms

``--model_args`` of ``eah``:

* ``interventions=SPEC``: the spec grammar of `eah_interp.interventions.parse` (``none``, ``eah``,
  ``eah+pai``, ``pai(alpha=0.5)``, a JSON file). Presets get model-aware defaults: EAH's sink threshold is
  scaled to the model's image-token count exactly as `eah_interp.models.load_model` does. lmms-eval splits
  ``--model_args`` on commas outside ``[]``/``{}``/quotes; a call whose commas fall inside ``(...)``
  (``pai(alpha=0.5,layers=[2])``) is put back together here.
* ``base=NAME``: the lmms-eval model that loads the checkpoint and builds the prompts (default ``llava_hf``;
  any lmms-eval model whose instance exposes the transformers model as ``.model``: ``llava_hf``,
  ``qwen2_5_vl``, ``qwen2_vl``, ``idefics2``, ...), resolved as ``--model NAME`` would be (its chat class
  first; ``base_simple=true`` takes its simple class), or ``base=eah_interp`` for eah-interp's own
  `eah_interp.models.load_model` (every family it supports; one image per request).
* every other argument (``pretrained``, ``dtype``, ``attn_implementation``, ``device_map``, ...) and
  lmms-eval's ``batch_size`` / ``device`` go to the base unchanged.

What it does per request: the base answers it as it would alone, with ``hf.intervene(model, items)``
active around the call (the layout is derived from ``input_ids`` at every prompt forward, so batches,
padding, several images and beams are seen as they are). Each ``generate_until`` answer carries a note in
its ``token_counts`` (the one per-request field of a model's answer that lmms-eval writes into the samples
file): ``{"output_tokens": ..., "eah_interp": {"interventions": SPEC, "calls": [summary, ...]}}`` with,
per base call, `InterventionRun.summary()` (edits and changed entries per intervention, phase and layer;
EAH's source heads). Records are summarised and dropped per request, so memory stays flat over a task.
Loglikelihood and multi-round requests run under the interventions too, but lmms-eval logs no per-request
field for them.

Failures fail: any exception inside a request (an intervention, the base's ``generate`` — which lmms-eval's
models catch and turn into an empty answer — or the base itself) stops the run with `EvaluationAborted`, a
``BaseException`` that lmms-eval's ``except Exception`` blocks let through, so the CLI exits non-zero with the
cause instead of scoring empty answers.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from eah_interp.errors import ConfigError, UnsupportedModelError

try:
    from lmms_eval.api.instance import TokenCounts
    from lmms_eval.api.model import lmms
except ImportError as _error:  # the extra is not installed: say how to get it
    raise ImportError(
        "eah_interp.integrations.lmms_eval needs lmms-eval: pip install \"eah-interp[lmms]\" and then lmms-eval "
        "itself (GPU machine: pip install lmms-eval==0.7.3; CPU-only torch: pip install --no-deps "
        "lmms-eval==0.7.3, see docs/howto/lmms_eval.md)."
    ) from _error

#: The model id lmms-eval knows this plugin by (``--model eah``).
MODEL_ID = "eah"
#: The key of the argument each logged sample gets.
SAMPLE_KEY = "eah_interp"
#: ``base=`` values that mean eah-interp's own loader (`eah_interp.models.load_model`).
OWN_BASES = ("eah_interp", "eah-interp")


def manifest():
    """The ``lmms_eval.models`` entry point: lmms-eval's manifest of ``--model eah``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(
        model_id=MODEL_ID,
        simple_class_path=f"{__name__}.InterventionModel",
        aliases=("eah_interp",),
    )


class EvaluationAborted(BaseException):  # noqa: N818 - it stops the run; it is not an error to recover from
    """A request of an lmms-eval run failed; the run stops (the cause is ``__cause__``).

    A ``BaseException``, not an ``Exception``: lmms-eval's models catch every ``Exception`` around
    ``generate`` (an empty answer is scored instead) and its CLI catches every ``Exception`` of a run (and
    exits 0). This one passes both, so a failed run exits non-zero and ``simple_evaluate`` raises.
    """


# ---------------------------------------------------------------------------------------------- arguments
def rejoin_spec(kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The ``interventions`` spec of lmms-eval's model arguments, put back if the comma split cut it.

    ``interventions=pai(alpha=0.5,layers=[2])`` reaches the model as ``interventions="pai(alpha=0.5"`` and
    ``layers="[2])"`` (lmms-eval protects only ``[]``, ``{}`` and quotes). While the spec's parentheses are
    unbalanced, the keyword arguments that followed it (in their command-line order, which ``**kwargs``
    keeps) are joined back as ``,key=value``.

    Args:
        kwargs: every model argument, in command-line order.

    Returns:
        The spec text (``none`` if absent; surrounding quotes removed) and the other arguments.

    Raises:
        ConfigError: the parentheses never balance.
    """
    keys = list(kwargs)
    rest = dict(kwargs)
    if "interventions" not in rest:
        return "none", rest
    text = str(rest.pop("interventions")).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    after = keys[keys.index("interventions") + 1 :]
    while text.count("(") > text.count(")"):
        if not after:
            raise ConfigError(
                f"interventions={text!r} has an unclosed '('; write the whole call, e.g. "
                "interventions=pai(alpha=0.5) (quote the --model_args value in the shell)."
            )
        key = after.pop(0)
        text += f",{key}={_literal(rest.pop(key))}"
    return text, rest


def _literal(value: Any) -> str:
    """A model argument back as spec text (lmms-eval turned ``true`` / ``2`` / ``0.5`` into Python values)."""
    return repr(value) if isinstance(value, bool) else str(value)


class _LazyDefaults(Mapping):
    """``parse``'s ``defaults``, computed only when the spec names a method that has one (EAH)."""

    def __init__(self, compute: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self._compute = compute
        self._value: dict[str, dict[str, Any]] | None = None

    def _get(self) -> dict[str, dict[str, Any]]:
        if self._value is None:
            self._value = self._compute()
        return self._value

    def __getitem__(self, key: str) -> dict[str, Any]:
        if key != "EAH":
            raise KeyError(key)
        return self._get()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(("EAH",))

    def __len__(self) -> int:
        return 1


def model_defaults(model: Any, processor: Any, name: str) -> dict[str, dict[str, Any]]:
    """Model-aware defaults of the spec grammar for a model loaded by someone else (an lmms-eval base).

    The same rule and probe as `eah_interp.models.load_model` (`ModelBundle.intervention_defaults`): EAH's
    threshold scaled to the image tokens of a caption prompt with one 336 px image. The tokenizer's padding
    side and pad token and the model's ``generation_config.pad_token_id``, which building a bundle sets,
    are put back, so the base runs exactly as it would alone.
    """
    from eah_interp.models import bundle_for

    if processor is None or getattr(processor, "tokenizer", None) is None:
        raise ConfigError(
            f"{name}: found no processor (with a tokenizer) on the lmms-eval model, so EAH's threshold cannot be "
            "scaled to its image-token count; give it in the spec: interventions=eah(threshold=0.0008)."
        )
    tokenizer = processor.tokenizer
    generation = getattr(model, "generation_config", None)
    saved = (tokenizer.padding_side, tokenizer.pad_token, getattr(generation, "pad_token_id", None))
    try:
        bundle = bundle_for(name, model, processor)
    finally:
        tokenizer.padding_side = saved[0]
        if tokenizer.pad_token != saved[1]:
            tokenizer.pad_token = saved[1]
        if generation is not None:
            generation.pad_token_id = saved[2]
    return bundle.intervention_defaults()


def _processor_of(base: Any) -> Any:
    """The HF processor an lmms-eval model holds (its attribute name varies by model)."""
    for name in ("processor", "_processor", "_image_processor", "image_processor"):
        value = getattr(base, name, None)
        if value is not None and getattr(value, "tokenizer", None) is not None:
            return value
    return None


# ---------------------------------------------------------------------------------------------- the model
@dataclass
class NotedTokenCounts(TokenCounts):
    """lmms-eval's per-request token counts plus what the interventions did (under `SAMPLE_KEY`)."""

    note: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), SAMPLE_KEY: self.note}


class _Watch:
    """Wraps ``model.generate`` for one base call: counts the calls and keeps the first exception.

    lmms-eval's models catch every exception of ``generate`` and score an empty answer; the wrapper sees the
    exception first, so the run can stop with it.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.calls = 0
        self.error: BaseException | None = None

    def __enter__(self) -> _Watch:
        original = self.model.generate
        self._had_own = "generate" in vars(self.model)

        @functools.wraps(original)
        def generate(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            try:
                return original(*args, **kwargs)
            except BaseException as err:
                if self.error is None:
                    self.error = err
                raise

        self._original = original
        object.__setattr__(self.model, "generate", generate)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._had_own:
            object.__setattr__(self.model, "generate", self._original)
        else:
            object.__delattr__(self.model, "generate")


@contextmanager
def _quiet_progress(base: Any) -> Iterator[None]:
    """Silence the base's own progress bar while it answers one request at a time (one bar is ours)."""
    from tqdm import tqdm

    modules = {sys.modules.get(cls.__module__) for cls in type(base).__mro__} - {None}
    patched = [(m, m.tqdm) for m in modules if getattr(m, "tqdm", None) is tqdm]
    for module, _ in patched:
        module.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        for module, original in patched:
            module.tqdm = original


class InterventionModel(lmms):
    """``--model eah``: an lmms-eval base model answering every request under an intervention spec.

    Args:
        pretrained: the checkpoint (hub id or ``save_pretrained`` folder), passed to the base.
        interventions: the spec (`eah_interp.interventions.parse`); ``none`` is the base alone.
        base: the lmms-eval model that loads and prompts the checkpoint (``llava_hf`` by default), or
            ``eah_interp`` for `eah_interp.models.load_model`.
        base_simple: take the base's simple class where lmms-eval has a chat one too.
        **kwargs: everything else, for the base unchanged.
    """

    def __init__(self, **kwargs: Any) -> None:  # one **kwargs: their command-line order matters (rejoin_spec)
        super().__init__()
        spec, kwargs = rejoin_spec(kwargs)
        base = str(kwargs.pop("base", "llava_hf"))
        base_simple = kwargs.pop("base_simple", False)
        if base in OWN_BASES:
            self.base = BundleModel(**kwargs)
            model = self.base.model
            defaults: Mapping[str, Mapping[str, Any]] = self.base.bundle.intervention_defaults()
        else:
            from lmms_eval.models import get_model

            cls = get_model(base, force_simple=bool(base_simple))
            self.base = cls(**kwargs)
            model = getattr(self.base, "model", None)
            if model is None or not callable(getattr(model, "generate", None)):
                raise UnsupportedModelError(
                    f"base={base}: the lmms-eval model {cls.__module__}.{cls.__name__} exposes no transformers model "
                    "as .model, so eah cannot apply interventions to it. Use a base that does (llava_hf, qwen2_5_vl, "
                    "qwen2_vl, idefics2, ...) or base=eah_interp (eah-interp's own loader)."
                )
            processor = _processor_of(self.base)
            defaults = _LazyDefaults(lambda: model_defaults(model, processor, str(kwargs.get("pretrained", base))))
        self.base_name = base
        from eah_interp.experiments import check_fits
        from eah_interp.interventions import format_spec, parse

        self.items = parse(spec, defaults=defaults)  # VAR without dims: its message says how to find them
        check_fits(model, self.items)  # layers / heads against the model now, not at request 1
        self.spec = format_spec(self.items)
        self.is_simple = self.base.is_simple  # the tasks build simple or chat requests as the base needs
        self._rank = getattr(self.base, "rank", 0)
        self._world_size = getattr(self.base, "world_size", 1)

    # -- what lmms-eval reads or sets on a model: the base's
    @property
    def model(self) -> Any:
        """The transformers model the interventions act on (the base's)."""
        return self.base.model

    @property
    def task_dict(self) -> dict:  # type: ignore[override]
        return self.base.task_dict

    @task_dict.setter
    def task_dict(self, value: dict) -> None:
        if "base" in vars(self):
            self.base.task_dict = value

    @property
    def cache_hook(self) -> Any:  # type: ignore[override]
        return self.base.cache_hook if "base" in vars(self) else None

    @cache_hook.setter
    def cache_hook(self, value: Any) -> None:
        if "base" in vars(self):
            self.base.cache_hook = value

    def __getattr__(self, name: str) -> Any:  # batch_size, device, accelerator, tokenizer, chat_template, ...
        if name == "base" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def clean(self) -> None:
        self.base.clean()

    # -- requests
    def generate_until(self, requests: list) -> list:
        return self._answer(requests, "generate_until")

    def generate_until_multi_round(self, requests: list) -> list:
        return self._answer(requests, "generate_until_multi_round")

    def loglikelihood(self, requests: list) -> list:
        return self._answer(requests, "loglikelihood")

    def _answer(self, requests: list, method: str) -> list:
        """Every request through the base, a chunk of ``batch_size`` at a time, under the interventions."""
        from tqdm import tqdm

        size = self.base.batch_size if isinstance(getattr(self.base, "batch_size", 1), int) else 1
        answers: list = []
        bar = tqdm(total=len(requests), desc=f"eah: {self.spec}", disable=True if self.rank != 0 else None)
        try:
            for start in range(0, len(requests), max(1, size)):
                chunk = requests[start : start + max(1, size)]
                out, summaries = self._call(chunk, method)
                note = {"interventions": self.spec, "calls": summaries}
                if len(chunk) > 1:
                    note["batch"] = len(chunk)  # the summaries are of the whole batch's calls
                answers.extend(_with_note(answer, note) if method == "generate_until" else answer for answer in out)
                bar.update(len(chunk))
        finally:
            bar.close()
        return answers

    def _call(self, chunk: list, method: str) -> tuple[list, list]:
        """One base call; its answers and one summary per model call inside it."""
        from eah_interp import hf

        model = self.base.model
        summaries: list = []
        with _Watch(model) as watch:
            try:
                with _quiet_progress(self.base), hf.intervene(model, self.items) as run:  # none: the base alone
                    out = getattr(self.base, method)(chunk)
                summaries.append(run.summary())
                del run
            except (KeyboardInterrupt, EvaluationAborted):
                raise
            except BaseException as err:
                raise EvaluationAborted(f"{_where(chunk, method, self.base_name)} failed: {type(err).__name__}: {err}") from err
        if watch.error is not None:
            raise EvaluationAborted(
                f"{_where(chunk, method, self.base_name)}: generate raised {type(watch.error).__name__}: {watch.error} "
                "(the base caught it and would have scored an empty answer)"
            ) from watch.error
        if method != "loglikelihood" and watch.calls == 0:
            raise EvaluationAborted(
                f"{_where(chunk, method, self.base_name)}: the base answered without calling generate (it caught a "
                "failure before generation, e.g. an unreadable image or video); no answer of this run can be trusted."
            )
        if watch.calls > 1 and self.items:  # one intervene context spans every call: say how many shared it
            summaries[-1] = {**summaries[-1], "generate_calls": watch.calls}
        if len(out) != len(chunk):
            raise EvaluationAborted(f"{_where(chunk, method, self.base_name)}: the base gave {len(out)} answers for {len(chunk)} requests.")
        return out, summaries


def _with_note(answer: Any, note: dict[str, Any]) -> Any:
    """A generate answer carrying the interventions' note in its token counts (the one per-request field
    of a model's answer that lmms-eval writes into the samples file: ``token_counts``)."""
    from lmms_eval.api.instance import GenerationResult

    if isinstance(answer, GenerationResult):
        text, counts = answer.text, answer.token_counts
    elif isinstance(answer, str):
        text, counts = answer, None
    else:  # an answer shape lmms-eval does not log per request: left as it is
        return answer
    noted = NotedTokenCounts(
        input_tokens=getattr(counts, "input_tokens", None),
        output_tokens=getattr(counts, "output_tokens", None),
        reasoning_tokens=getattr(counts, "reasoning_tokens", None),
        note=note,
    )
    return GenerationResult(text=text, token_counts=noted)


def _where(chunk: list, method: str, base: str) -> str:
    first = chunk[0]
    docs = ", ".join(str(getattr(r, "doc_id", "?")) for r in chunk)
    return f"eah (base={base}) {method} on task {getattr(first, 'task_name', '?')} doc {docs}"


# ---------------------------------------------------------------------------------------------- base=eah_interp
class BundleModel(lmms):
    """An lmms-eval model over `eah_interp.models.load_model`: its prompts, its padding, every family it knows.

    Simple-model requests (``doc_to_visual`` + text); one image per request; ``generate_until`` only.
    Args (from ``--model_args``): ``pretrained`` (a name, folder or hub id), ``dtype``, ``device``,
    ``device_map``, ``attn_implementation`` (``load_model``'s) and ``batch_size`` (requests per
    ``generate``: consecutive requests with the same generation arguments).
    """

    def __init__(
        self,
        pretrained: str = "organism",
        batch_size: int | str = 1,
        device: str | None = None,
        dtype: str | None = None,
        device_map: str | None = None,
        attn_implementation: str = "sdpa",
        max_batch_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ConfigError(
                f"base=eah_interp takes pretrained, dtype, device, device_map, attn_implementation and batch_size; "
                f"got also {sorted(kwargs)}."
            )
        from eah_interp.models import load_model

        self.bundle = load_model(str(pretrained), dtype=dtype, device=device, device_map=device_map,
                                 attn_implementation=attn_implementation)
        self.batch_size_per_gpu = int(batch_size) if str(batch_size).isdigit() else 1

    @property
    def model(self) -> Any:
        return self.bundle.model

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> Any:
        return self.bundle.device

    def generate_until(self, requests: list) -> list[str]:
        answers: list[str] = []
        i = 0
        while i < len(requests):
            group = [requests[i]]
            while (i + len(group) < len(requests) and len(group) < self.batch_size
                   and requests[i + len(group)].args[1] == requests[i].args[1]):
                group.append(requests[i + len(group)])
            answers.extend(self._generate(group))
            i += len(group)
        return answers

    def _generate(self, group: list) -> list[str]:
        import copy

        import torch

        prompts, images = [], []
        for request in group:
            context, _, doc_to_visual, doc_id, task, split = request.args[:6]
            visuals = doc_to_visual(self.task_dict[task][split][doc_id])
            if len(visuals) != 1:
                raise ConfigError(
                    f"base=eah_interp answers requests with one image; {task} doc {doc_id} has {len(visuals)}. "
                    "Use an lmms-eval base for this task (base=llava_hf, base=qwen2_5_vl, ...)."
                )
            prompts.append(self.bundle.prompt(context.replace("<image>", "").strip()))
            images.append(visuals[0])
        gen = copy.deepcopy(group[0].args[1])
        until = gen.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen.get("temperature", 0) or 0)
        sample = temperature > 0
        options: dict[str, Any] = {
            "max_new_tokens": int(gen.get("max_new_tokens", 1024)),
            "num_beams": int(gen.get("num_beams", 1) or 1),
            "do_sample": sample,
        }
        if sample:
            options.update(temperature=temperature, top_p=gen.get("top_p") or 1.0)
        inputs = self.bundle.encode(prompts, images)
        with torch.inference_mode():
            output = self.model.generate(**inputs, **options)
        texts = self.bundle.decode(output, inputs)
        for stop in until:
            texts = [t.split(stop)[0] if stop else t for t in texts]
        return texts

    def loglikelihood(self, requests: list) -> list:
        raise NotImplementedError("base=eah_interp answers generate_until requests only; use base=llava_hf for loglikelihood tasks.")

    def generate_until_multi_round(self, requests: list) -> list:
        raise NotImplementedError("base=eah_interp answers generate_until requests only; use base=llava_hf for multi-round tasks.")
