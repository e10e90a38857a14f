"""Tiny serving assets for engine and API tests: a checkpoint with a real tokenizer, and adapters.

`build_tiny_server_assets(tmp_path, kind, num_adapters)` writes
`tmp_path/ckpt` (an owq checkpoint of a tiny random Llama / OPT / GPT-2 with a 128-token
character-level BPE tokenizer and a chat template) and `tmp_path/adapters/adapter-<i>` (random
perturbations of the base's weak columns). Everything is built here, nothing is downloaded.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from tiny_models import rtn_swap, tiny_config
from tokenizers import Tokenizer, decoders, models, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from owq.kernels.adapters import Adapter, adapter_from_model, apply_adapter, save_adapter
from owq.kernels.checkpoint import QuantConfig, load_checkpoint, save_checkpoint

VOCAB = 128
EOS = "<|endoftext|>"
UNK = "<unk>"
BITS, GROUP, WEAK = 4, 32, 4
INIT_STD = 0.3
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune,",
    "must be in want of a wife. However little known the feelings or views of such a man may be",
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the",
    "surrounding families, that he is considered the rightful property of some one or other of",
    "their daughters. Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who,",
    "for his own amusement, never took up any book but the Baronetage. 0123456789 !?.,;:'\"()-",
]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level BPE with a few merges: printable ASCII + newline, 128 ids, EOS = 0."""
    alphabet = [chr(c) for c in range(32, 127)] + ["\n"]
    bpe = Tokenizer(models.BPE(unk_token=UNK))
    bpe.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=[EOS, UNK],
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, unk_token=UNK)
    tok.pad_token = EOS
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_quantized_model(
    kind: str = "llama", seed: int = 0, group_size: int = GROUP, bits: int = BITS, weak=None
):
    """A tiny random model (128-token vocab, EOS = 0) with every linear an RTN OWQLinear, with
    `weak` weak columns (`tiny_models.rtn_swap`; default WEAK in every layer)."""
    config = tiny_config(kind)
    config.vocab_size = VOCAB
    config.bos_token_id = config.eos_token_id = config.pad_token_id = 0
    config.initializer_range = config.init_std = INIT_STD  # peaked logits: outputs that differ
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    return rtn_swap(model, bits, group_size, WEAK if weak is None else weak, seed=seed)


def random_adapter(model, name: str, seed: int, scale: float = 2.0) -> Adapter:
    """The base's weak columns plus noise of `scale` times their own std, as an adapter."""
    adapter = adapter_from_model(model, name, task=f"random-{seed}")
    gen = torch.Generator().manual_seed(seed)
    for layer, cols in adapter.columns.items():
        noise = torch.randn(cols.shape, generator=gen) * scale * cols.float().std().clamp_min(0.02)
        adapter.columns[layer] = (cols.float() + noise).to(torch.float16)
    return adapter


def merged_models(model, adapters: list[Adapter]) -> list:
    """[model, model with adapter 1 merged into its own columns, ...] (copies): the reference of
    each slot of `runtime_of(model, ..., adapters)`."""
    merged = [model]
    for adapter in adapters:
        copied = copy.deepcopy(model)
        apply_adapter(copied, adapter)
        merged.append(copied)
    return merged


def write_slot(runtime, slot: int, adapter: Adapter) -> None:
    """Write an adapter into one slot of every runtime layer (the base's columns where the
    adapter has none), as the server's slot table does."""
    for name, (layer, part) in runtime.targets.items():
        layer.set_slot(slot, adapter.columns.get(name), part)


def runtime_of(model, max_context: int = 64, adapters: list[Adapter] = ()):
    """The own runtime over a quantized model's tensors, adapter i written into slot i + 1."""
    from owq.server.runtime import build_runtime

    rt = build_runtime(model.config, model.state_dict(), max_context, num_slots=len(adapters))
    for slot, adapter in enumerate(adapters, start=1):
        write_slot(rt, slot, adapter)
    return rt


def build_tiny_server_assets(
    tmp_path: str | Path,
    kind: str = "llama",
    num_adapters: int = 3,
    group_size: int = GROUP,
    bits: int = BITS,
) -> tuple[Path, Path]:
    """(ckpt_dir, adapters_dir) under tmp_path; adapters are named adapter-0 .. adapter-{n-1}."""
    tmp_path = Path(tmp_path)
    model = tiny_quantized_model(kind, group_size=group_size, bits=bits)
    ckpt = save_checkpoint(
        model, tmp_path / "ckpt", QuantConfig(bits, group_size), tiny_tokenizer()
    )
    base = load_checkpoint(ckpt)
    adapters = tmp_path / "adapters"
    adapters.mkdir(parents=True, exist_ok=True)
    for i in range(num_adapters):
        save_adapter(random_adapter(base, f"adapter-{i}", seed=100 + i), adapters / f"adapter-{i}")
    return ckpt, adapters


def write_foreign_adapter(adapters_dir: str | Path, name: str = "foreign") -> Path:
    """An adapter tuned on another base (another seed's weak columns): loading it must fail."""
    other = tiny_quantized_model("llama", seed=12345)
    return save_adapter(random_adapter(other, name, seed=7), Path(adapters_dir) / name)


# engine helpers ---------------------------------------------------------------------------------
def started_engine(ckpt: Path, adapters: Path | None = None, observer=None, **kwargs):
    """An `Engine` on the tiny checkpoint, started and warmed up (kwargs: EngineConfig's)."""
    from owq.server.engine import Engine, EngineConfig

    engine = Engine.from_checkpoint(ckpt, EngineConfig(**kwargs), adapters, observer)
    engine.start()
    assert engine.wait_ready(60), "engine did not become ready"
    return engine


def request(engine, text: str, adapter: str | None = None, rid: str = "r", **params):
    """A GenerationRequest for `text` (greedy unless temperature is given) on the loaded
    version of `adapter` (a name; None or the base's name = the base; AdapterNotLoaded else)."""
    from owq.server.protocol import GenerationRequest, SamplingParams

    params.setdefault("temperature", 0.0)
    ids = tuple(engine.tokenizer(text)["input_ids"])
    handle = engine.adapters.current(engine.adapters.adapter_name(adapter))
    return GenerationRequest(rid, ids, SamplingParams(**params), handle)


async def collect(engine, req, on_event=None) -> list:
    """Every event of one request; `on_event(i, event)` is called as they arrive."""
    events = []
    async for event in engine.generate(req):
        if on_event is not None:
            on_event(len(events), event)
        events.append(event)
    return events


def token_ids(events) -> list[int]:
    return [e.token_id for e in events if hasattr(e, "token_id")]


def text_of(events) -> str:
    return "".join(e.text for e in events if hasattr(e, "token_id"))


class RecordingObserver:
    """EngineObserver that keeps every call, for assertions."""

    def __init__(self):
        self.steps: list[tuple[int, int]] = []
        self.adapter_calls: list[tuple[int, float | None]] = []
        self.phases: list[tuple[str, str, float]] = []

    def on_step(self, running: int, queued: int) -> None:
        self.steps.append((running, queued))

    def on_phase(self, phase: str, adapters: str, seconds: float) -> None:
        self.phases.append((phase, adapters, seconds))

    def on_adapters(self, loaded: int, load_seconds: float | None) -> None:
        self.adapter_calls.append((loaded, load_seconds))

    @property
    def max_running(self) -> int:
        return max((r for r, _ in self.steps), default=0)
