"""Typed rollout requests and samples, and the validation of SGLang /generate answers.

A sample carries what the learner and the staleness buffer need: prompt and response token ids, the
behaviour log-probs (SGLang's ``output_token_logprobs``), the weight version that produced each response
token (from ``meta_info.weight_versions`` spans), the finish reason and the server that answered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

__all__ = [
    "FinishReason",
    "SamplingParams",
    "WeightVersionSpan",
    "RolloutSample",
    "SampleGroup",
    "ServerResponseError",
    "RolloutError",
    "parse_weight_version",
    "parse_generate_output",
]

FinishReason = Literal["stop", "length", "abort"]


class ServerResponseError(ValueError):
    """A server answer does not have the shape this client relies on; the message names the field."""


class RolloutError(RuntimeError):
    """A prompt could not be answered (every attempt failed, or the request itself is invalid)."""


@dataclass(frozen=True)
class SamplingParams:
    """The subset of SGLang sampling params a rollout uses (sglang/srt/sampling/sampling_params.py).

    temperature=0 is greedy. ``n`` samples per prompt come back as one group.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    n: int = 1
    ignore_eos: bool = False
    seed: int | None = None  # SGLang's sampling_seed (deterministic sampling per request)

    def validate(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p={self.top_p} must be in (0, 1]")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"SamplingParams.top_k={self.top_k} must be -1 (off) or >= 1")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.n < 1:
            raise ValueError(f"SamplingParams.n={self.n} must be >= 1")
        if any((not isinstance(t, int)) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"SamplingParams.stop_token_ids={self.stop_token_ids!r} must be non-negative ints")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "max_new_tokens": self.max_new_tokens,
            "ignore_eos": self.ignore_eos,
            "n": self.n,
        }
        if self.stop_token_ids:
            out["stop_token_ids"] = list(self.stop_token_ids)
        if self.seed is not None:
            out["sampling_seed"] = self.seed
        return out


@dataclass(frozen=True)
class WeightVersionSpan:
    """Response tokens [start, end) were produced by weights of ``version``."""

    version: int
    start: int
    end: int


@dataclass
class RolloutSample:
    prompt_index: int  # index of the prompt in the batch passed to the client
    sample_index: int  # 0..n-1 within the prompt's group
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]  # behaviour log-probs, one per response token
    weight_versions: list[int]  # weight version (learner step) that produced each response token
    finish_reason: FinishReason
    server_url: str
    request_id: str = ""
    attempts: int = 1  # HTTP attempts this prompt took (> 1 after a retry)
    text: str | None = None
    version_spans: list[WeightVersionSpan] = field(default_factory=list)
    # rollout.routing_replay: the experts that routed each token, int tensor [prompt + response - 1, MoE
    # layers, top-k] in the smallest dtype holding the expert ids (learner/routing_replay.py); None: off
    routed_experts: Any = None

    @property
    def min_version(self) -> int:
        """Oldest weight version among the response tokens (staleness is measured from it)."""
        if not self.weight_versions:
            raise ValueError(f"sample {self.prompt_index}/{self.sample_index} has no response tokens, hence no version")
        return min(self.weight_versions)

    @property
    def max_version(self) -> int:
        if not self.weight_versions:
            raise ValueError(f"sample {self.prompt_index}/{self.sample_index} has no response tokens, hence no version")
        return max(self.weight_versions)


class SampleGroup(list):
    """The n samples of one prompt (a GRPO group), in sample order; a plain list plus the version range the
    staleness buffer (rollout/buffer.py) admits or rejects as a whole."""

    @property
    def prompt_index(self) -> int:
        return self[0].prompt_index

    # The one definition of a group's versions: over the samples that have response tokens (an empty
    # response carries no version and is not trained on).
    @property
    def min_version(self) -> int:
        return min(s.min_version for s in self if s.weight_versions)

    @property
    def max_version(self) -> int:
        return max(s.max_version for s in self if s.weight_versions)


def parse_weight_version(label: Any, where: str, aliases: dict[str, int] | None = None) -> int:
    """SGLang labels are strings; this project tags them with str(step). ``aliases`` maps other labels
    (e.g. the server default "default" -> 0, the weights it was started with)."""
    if isinstance(label, int) and not isinstance(label, bool):
        return label
    if isinstance(label, str):
        if aliases and label in aliases:
            return aliases[label]
        try:
            return int(label)
        except ValueError:
            pass
    raise ServerResponseError(
        f"{where}={label!r} is not an integer weight version; start servers with --weight-version 0 and sync "
        "with weight_version=str(step) (the fleet and WeightSync do), or map the label in version_aliases"
    )


def _field(obj: dict, key: str, where: str, types: type | tuple[type, ...]) -> Any:
    if not isinstance(obj, dict):
        raise ServerResponseError(f"{where} must be a JSON object, got {type(obj).__name__}")
    if key not in obj:
        raise ServerResponseError(
            f"{where}.{key} is missing (keys: {sorted(obj)[:12]}); is the server SGLang >= 0.5.21 and was "
            "return_logprob=true sent?"
        )
    value = obj[key]
    if not isinstance(value, types):
        raise ServerResponseError(f"{where}.{key} has type {type(value).__name__}, expected {types}")
    return value


def _finish_reason(meta: dict, where: str) -> FinishReason:
    fr = _field(meta, "finish_reason", where, dict)
    kind = fr.get("type")
    if kind not in ("stop", "length", "abort"):
        raise ServerResponseError(f"{where}.finish_reason.type={kind!r}; expected 'stop', 'length' or 'abort'")
    return kind


def _spans(meta: dict, n_tokens: int, where: str, aliases: dict[str, int] | None) -> list[WeightVersionSpan]:
    raw = meta.get("weight_versions")
    if raw is None:  # SGLang < 0.5.20 has only the label at response time: applies to every token
        version = parse_weight_version(_field(meta, "weight_version", where, (str, int)), f"{where}.weight_version", aliases)
        return [WeightVersionSpan(version, 0, n_tokens)] if n_tokens else []
    if not isinstance(raw, list):
        raise ServerResponseError(f"{where}.weight_versions must be a list of spans, got {type(raw).__name__}")
    spans, cursor = [], 0
    for i, span in enumerate(raw):
        w = f"{where}.weight_versions[{i}]"
        start = _field(span, "start", w, int)
        end = _field(span, "end", w, int)
        version = parse_weight_version(_field(span, "version", w, (str, int)), f"{w}.version", aliases)
        if start != cursor or end < start:
            raise ServerResponseError(f"{w} = [{start}, {end}) does not continue the previous span at {cursor}")
        if end > start:
            spans.append(WeightVersionSpan(version, start, end))
        cursor = end
    if cursor != n_tokens:
        raise ServerResponseError(f"{where}.weight_versions cover {cursor} tokens but the output has {n_tokens}")
    return spans


def parse_generate_output(
    obj: Any,
    *,
    prompt_ids: Sequence[int],
    prompt_index: int,
    sample_index: int,
    server_url: str,
    version_aliases: dict[str, int] | None = None,
    where: str = "response",
) -> RolloutSample:
    """One element of a /generate answer (input_ids + return_logprob=true) -> RolloutSample.

    Checks: output_ids are ints; output_token_logprobs has one [logprob, token_id, text] per output id
    with the same token id; weight_versions spans cover the output exactly; finish_reason is known.
    """
    if not isinstance(obj, dict):
        raise ServerResponseError(f"{where} must be a JSON object, got {type(obj).__name__}")
    if "error" in obj and "meta_info" not in obj:
        raise ServerResponseError(f"{where}: server returned an error object: {obj['error']!r}")
    output_ids = _field(obj, "output_ids", where, list)
    meta = _field(obj, "meta_info", where, dict)
    wm = f"{where}.meta_info"
    lps = _field(meta, "output_token_logprobs", wm, list)
    if len(lps) != len(output_ids):
        raise ServerResponseError(
            f"{wm}.output_token_logprobs has {len(lps)} entries but output_ids has {len(output_ids)}"
        )
    logprobs: list[float] = []
    for i, (entry, tok) in enumerate(zip(lps, output_ids)):
        w = f"{wm}.output_token_logprobs[{i}]"
        if not isinstance(tok, int) or isinstance(tok, bool):
            raise ServerResponseError(f"{where}.output_ids[{i}]={tok!r} is not a token id")
        if not isinstance(entry, (list, tuple)) or len(entry) < 2:
            raise ServerResponseError(f"{w}={entry!r}; expected [logprob, token_id, text]")
        lp, tid = entry[0], entry[1]
        if not isinstance(lp, (int, float)) or isinstance(lp, bool) or lp != lp or lp > 1e-4:
            raise ServerResponseError(f"{w}[0]={lp!r} is not a log-probability (a finite number <= 0)")
        if tid != tok:
            raise ServerResponseError(f"{w}[1]={tid!r} differs from output_ids[{i}]={tok!r}")
        logprobs.append(float(lp))
    spans = _spans(meta, len(output_ids), wm, version_aliases)
    versions = [s.version for s in spans for _ in range(s.end - s.start)]
    text = obj.get("text")
    return RolloutSample(
        prompt_index=prompt_index,
        sample_index=sample_index,
        prompt_ids=list(prompt_ids),
        response_ids=list(output_ids),
        logprobs=logprobs,
        weight_versions=versions,
        finish_reason=_finish_reason(meta, wm),
        server_url=server_url,
        request_id=str(meta.get("id", "")),
        text=text if isinstance(text, str) else None,
        version_spans=spans,
    )
