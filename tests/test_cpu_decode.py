"""The fused CPU decode step (`kernels/cpu_decode.cpp`) against its twin, the runtime's eager
Llama blocks: one decode step of rows at different positions, on the base and on two adapter
slots, for tied and untied heads, a q/k/v bias (Qwen2), per-head q/k norms (Qwen3), centred
3-bit and grouped 4-bit codes (the zero term); each row's numbers the same alone as beside
others; the eager blocks where the fused step does not apply."""

from types import SimpleNamespace

import pytest
import torch
from engine_fixtures import random_adapter, runtime_of, tiny_quantized_model, write_slot

from owq.kernels import cpu_build
from owq.server.runtime import KVCache, build_runtime, step_index
from owq.server.runtime.llama import FUSED_PROMPT_ROWS

LENGTHS = [5, 9, 3, 7]  # each row's prompt: the decode step's rows sit at different positions


def prefilled(rt, tokens: torch.Tensor, slots: torch.Tensor) -> KVCache:
    """Each row's prompt (its own length) written into its own cache row."""
    cache = KVCache(rt.cache_shape(len(LENGTHS)))
    with torch.inference_mode():
        for row, n in enumerate(LENGTHS):
            step = step_index(cache.shape, row, torch.arange(n)[None])
            rt(tokens[row : row + 1, :n], step, cache, slots[row : row + 1], "none")
    return cache


def decode(rt, cache: KVCache, tokens: torch.Tensor, slots, row0: int = 0, lengths=None):
    lengths = torch.tensor(lengths or LENGTHS[row0 : row0 + tokens.shape[0]])
    step = step_index(cache.shape, row0, lengths[:, None], decode=True)
    with torch.inference_mode():
        return rt(tokens, step, cache, slots, "last")


def setup(kind: str, group_size: int, bits: int, table_dtype=None, weak=None):
    model = tiny_quantized_model(kind, group_size=group_size, bits=bits, weak=weak)
    adapters = [random_adapter(model, f"a{i}", seed=i) for i in (1, 2)]
    if table_dtype is None:
        rt = runtime_of(model, 64, adapters)
    else:
        rt = build_runtime(
            model.config, model.state_dict(), 64, num_slots=2, table_dtype=table_dtype
        )
        for slot, adapter in enumerate(adapters, start=1):
            write_slot(rt, slot, adapter)
    rt.prepare(packed=True)
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randint(1, 128, (len(LENGTHS), max(LENGTHS) + 1), generator=gen)
    return rt, tokens


def next_tokens(tokens: torch.Tensor) -> torch.Tensor:
    return torch.stack([tokens[row, n] for row, n in enumerate(LENGTHS)])[:, None]


def eager_and_fused(rt, tokens, slots, rows=slice(None)):
    """One decode step of `rows` after their prompts, through the fused step and the eager
    blocks, each on its own cache: (fused logits, eager logits, fused cache, eager cache)."""
    fused_cache, eager_cache = prefilled(rt, tokens, slots), prefilled(rt, tokens, slots)
    row0 = rows.start or 0
    fused = decode(rt, fused_cache, next_tokens(tokens)[rows], slots[rows], row0=row0)
    rt.fused, stack = None, rt.fused
    try:
        eager = decode(rt, eager_cache, next_tokens(tokens)[rows], slots[rows], row0=row0)
    finally:
        rt.fused = stack
    return fused, eager, fused_cache, eager_cache


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("group_size,bits", [(-1, 3), (32, 4)])
def test_fused_step_equals_the_eager_blocks(kind, group_size, bits):
    rt, tokens = setup(kind, group_size, bits)
    assert rt.fused is not None, "the fused step must build here (a C++ compiler and ninja)"
    slots = torch.tensor([0, 1, 2, 1])
    fused, eager, fused_cache, eager_cache = eager_and_fused(rt, tokens, slots)
    # bf16 activations into the 4-bit kernel: an fp32 difference in the last bit may round one
    # input to the next bf16 (2^-8 relative); two blocks keep that under 3e-3 of the logits
    # (2.4e-3 on Qwen3's row 0 here, 1e-7 on its other rows and on other tokens). Rows on
    # adapters: the eager bag rounds their weak sums to fp16, the fused step keeps them in fp32
    # (about 1% here, where the adapters are noise twice the columns' std). A wrong head,
    # position, slot or norm is of the order of the logits themselves.
    scale = float(eager.abs().max())
    torch.testing.assert_close(fused[0], eager[0], rtol=0, atol=3e-3 * scale)
    torch.testing.assert_close(fused[1:], eager[1:], rtol=0, atol=2e-2 * scale)
    swapped = decode(
        rt, prefilled(rt, tokens, slots), next_tokens(tokens), torch.tensor([0, 2, 1, 2])
    )
    assert float((swapped[1:] - eager[1:]).abs().max()) > 0.2 * scale  # slots are read
    for layer in range(len(rt.blocks)):  # the new keys (after RoPE) and values, written in place
        for a, b in ((fused_cache.k[layer], eager_cache.k[layer]),
                     (fused_cache.v[layer], eager_cache.v[layer])):  # fmt: skip
            top = float(b.abs().max())
            torch.testing.assert_close(a[0], b[0], rtol=0, atol=3e-3 * top)
            torch.testing.assert_close(a[1:], b[1:], rtol=0, atol=2e-2 * top)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_fp32_tables_agree_on_every_row(kind):
    """With fp32 slot tables neither path rounds a weak sum: rows on adapters agree as tightly as
    rows on the base (2e-3 of the logits, against 2e-2 on fp16 tables)."""
    rt, tokens = setup(kind, -1, 3, table_dtype=torch.float32)
    fused, eager, *_ = eager_and_fused(rt, tokens, torch.tensor([0, 1, 2, 1]))
    torch.testing.assert_close(fused, eager, rtol=0, atol=2e-3 * float(eager.abs().max()))


def test_per_head_q_k_norms_are_read():
    """Qwen3's per-head q/k norms, made unequal (random weights, q's unlike k's, block 0's unlike
    block 1's), run inside the fused step: it agrees with the eager blocks on every row and on
    every key it wrote (after norm and RoPE), and with a block's q and k norms swapped the keys
    it writes there move by far more than that."""
    rt, tokens = setup("qwen3", -1, 3, table_dtype=torch.float32)
    gen = torch.Generator().manual_seed(7)
    for block in rt.blocks:
        for norm in block.qk_norms:
            norm.copy_(1 + 0.5 * torch.randn(norm.shape, generator=gen))
    rt.prepare(packed=True)
    assert rt.fused is not None
    slots = torch.tensor([0, 1, 2, 1])
    fused, eager, fused_cache, eager_cache = eager_and_fused(rt, tokens, slots)
    torch.testing.assert_close(fused, eager, rtol=0, atol=2e-3 * float(eager.abs().max()))
    keys = eager_cache.k[1]
    torch.testing.assert_close(fused_cache.k[1], keys, rtol=0, atol=2e-3 * float(keys.abs().max()))
    q_norm, k_norm = rt.blocks[1].qk_norms
    rt.blocks[1].qk_norms = [k_norm, q_norm]
    rt.prepare(packed=True)
    *_, swapped_cache, _ = eager_and_fused(rt, tokens, slots)
    assert float((swapped_cache.k[1] - keys).abs().max()) > 0.2 * float(keys.abs().max())


def uneven(i: int) -> int:
    """k of linear i (model order, 7 per block) as a global allocation leaves it: none in the
    first block's q/k/v (a fused layer without weak columns), else 0 to 9, unlike neighbours."""
    return 0 if i < 3 else (0, 5, 0, 2, 9, 1)[i % 6]


def test_uneven_weak_columns_agree_on_every_row():
    rt, tokens = setup("llama", -1, 3, table_dtype=torch.float32, weak=uneven)
    ks = [len(p.rows) for b in rt.blocks for f in (b.qkv, b.gate_up, b.o, b.down) for p in f.parts]
    assert 0 in ks and len(set(ks)) >= 4 and rt.blocks[0].qkv.num_weak == 0, ks
    assert rt.fused is not None
    fused, eager, *_ = eager_and_fused(rt, tokens, torch.tensor([0, 1, 2, 1]))
    torch.testing.assert_close(fused, eager, rtol=0, atol=2e-3 * float(eager.abs().max()))


@pytest.mark.parametrize("row", [0, 2])
def test_a_lone_row_equals_the_eager_blocks(row):
    """One row decoding alone: the eager blocks take their slice write and no mask there."""
    rt, tokens = setup("llama", -1, 3, table_dtype=torch.float32)
    one = slice(row, row + 1)
    fused, eager, *_ = eager_and_fused(rt, tokens, torch.tensor([0, 1, 2, 1]), one)
    torch.testing.assert_close(fused, eager, rtol=0, atol=2e-3 * float(eager.abs().max()))


def test_rows_do_not_depend_on_the_step_they_share():
    """Bit for bit, through every block (the head's fp32 GEMM is MKL's, whose lone row differs)."""
    rt, tokens = setup("llama", -1, 3)
    slots = torch.tensor([0, 1, 2, 1])
    x = rt.vocab.embed(next_tokens(tokens))[:, 0]
    positions = torch.tensor(LENGTHS)
    cache = prefilled(rt, tokens, slots)
    together = rt.fused.step(x, positions, torch.arange(4), cache.k, cache.v, slots)
    for row in range(len(LENGTHS)):  # the same step again, each row on its own
        cache = prefilled(rt, tokens, slots)
        one = slice(row, row + 1)
        rows = torch.tensor([row])
        alone = rt.fused.step(x[one], positions[one], rows, cache.k, cache.v, slots[one])
        torch.testing.assert_close(alone[0], together[row], rtol=0, atol=0)


def test_rows_in_any_order_on_two_threads():
    """16 rows on shuffled slots, with enough weak columns that two threads share out the weak
    rows: every row's bits the same whatever the order of the rows in the step, and the same
    as that row alone in a step (where the calling thread sums it alone)."""
    rt, _ = setup("llama", -1, 3, weak=lambda i: 16)
    gen = torch.Generator().manual_seed(7)
    rows, threads = 16, torch.get_num_threads()
    slots = torch.randint(0, 3, (rows,), generator=gen)
    x = rt.vocab.embed(torch.randint(1, 128, (rows, 1), generator=gen))[:, 0]
    positions = torch.zeros(rows, dtype=torch.long)
    order = torch.randperm(rows, generator=gen)
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            cache = KVCache(rt.cache_shape(rows))
            together = rt.fused.step(x, positions, torch.arange(rows), cache.k, cache.v, slots)
            cache = KVCache(rt.cache_shape(rows))
            shuffled = rt.fused.step(x[order], positions, order, cache.k, cache.v, slots[order])
            cache = KVCache(rt.cache_shape(rows))
            base = rt.fused.step(x, positions, torch.arange(rows), cache.k, cache.v, slots * 0)
            alone = []  # one row a step: the weak rows on the calling thread alone
            for r in range(rows):
                cache = KVCache(rt.cache_shape(rows))
                one = slice(r, r + 1)
                step = rt.fused.step(x[one], positions[one], torch.tensor([r]), cache.k,
                                     cache.v, slots[one])  # fmt: skip
                alone.append(step[0])
    finally:
        torch.set_num_threads(threads)
    assert rows * 16 * rt.blocks[0].gate_up.out_features >= 1 << 15  # the threaded weak rows
    torch.testing.assert_close(shuffled, together[order], rtol=0, atol=0)
    torch.testing.assert_close(torch.stack(alone), together, rtol=0, atol=0)
    moved = (together - base).abs().amax(-1)
    assert bool((moved[slots > 0] > 0).all()) and not bool(moved[slots == 0].any()), moved


def test_rows_on_the_base_equal_no_slots():
    rt, tokens = setup("llama", -1, 3)
    base = torch.zeros(len(LENGTHS), dtype=torch.long)
    on_slots = decode(rt, prefilled(rt, tokens, base), next_tokens(tokens), base)
    no_slots = decode(rt, prefilled(rt, tokens, base), next_tokens(tokens), None)
    torch.testing.assert_close(on_slots, no_slots, rtol=0, atol=0)


def prompt_step(rt, cache, tokens, slots, first: int, fused: bool, runs=None) -> torch.Tensor:
    """A fast prompt step as the scheduler runs one: rows 0 .. B-1 padded to [B, T], each from
    position `first`, every token's logits; the fused step offered or not (`fused`), and
    checked to have run where `runs` (default: where offered)."""
    positions = first + torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1)
    step = step_index(cache.shape, 0, positions, fast=True)
    stack, ran = rt.fused, []
    spy = SimpleNamespace(step=lambda *a: ran.append(stack.step(*a)) or ran[-1])
    rt.fused = spy if fused else None
    try:
        with torch.inference_mode():
            out = rt(tokens, step, cache, slots, "all")
    finally:
        rt.fused = stack
    runs = fused if runs is None else runs
    assert len(ran) == int(runs) and all(r is not None for r in ran)  # it ran, or none did
    return out


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_a_prompt_step_equals_the_eager_blocks(kind):
    """Prompts through the fused step: two sequences padded to one step, in two chunks (the
    second attends to the first's cache), on the base and on an adapter, fp32 tables. Every
    real token's logits and every key and value it wrote agree with the eager blocks to fp32
    rounding; a causal mistake (a token seeing later ones) or a wrong cache row is of the
    order of the logits."""
    rt, tokens = setup(kind, -1, 3, table_dtype=torch.float32)
    slots, lengths = torch.tensor([0, 2]), [9, 6]  # the second prompt is padded in chunk 2
    caches = {True: KVCache(rt.cache_shape(2)), False: KVCache(rt.cache_shape(2))}
    got = {}
    for fused, cache in caches.items():
        first = prompt_step(rt, cache, tokens[:2, :4], slots, 0, fused)
        second = prompt_step(rt, cache, tokens[:2, 4:9], slots, 4, fused)
        got[fused] = torch.cat([first, second], 1)
    scale = float(got[False].abs().max())
    assert not torch.equal(got[True][0], got[False][0])  # two implementations: both ran
    for row, n in enumerate(lengths):
        torch.testing.assert_close(got[True][row, :n], got[False][row, :n], rtol=0,
                                   atol=2e-3 * scale)  # fmt: skip
        for layer in range(len(rt.blocks)):
            for a, b in ((caches[True].k[layer], caches[False].k[layer]),
                         (caches[True].v[layer], caches[False].v[layer])):  # fmt: skip
                top = float(b.abs().max())
                torch.testing.assert_close(a[row, :, :n], b[row, :, :n], rtol=0, atol=2e-3 * top)
    # a decode step after the chunked prompt gives the logits of the same token in one prompt
    decoded = decode(rt, caches[True], tokens[:1, 9:10], slots[:1], row0=0, lengths=[9])
    whole = prompt_step(rt, KVCache(rt.cache_shape(2)), tokens[:1, :10], slots[:1], 0, True)
    torch.testing.assert_close(decoded[0], whole[0, 9], rtol=0, atol=2e-3 * scale)


def test_a_prompt_token_sees_no_later_token():
    """Changing a prompt's last token leaves every earlier token's logits as they were, bit for
    bit: all keys are written before any row attends, but each reads positions 0 .. its own."""
    rt, tokens = setup("llama", -1, 3)
    slots = torch.tensor([1])
    a = prompt_step(rt, KVCache(rt.cache_shape(1)), tokens[:1, :8], slots, 0, True)
    changed = tokens[:1, :8].clone()
    changed[0, 7] = (changed[0, 7] % 127) + 1
    b = prompt_step(rt, KVCache(rt.cache_shape(1)), changed, slots, 0, True)
    torch.testing.assert_close(a[0, :7], b[0, :7], rtol=0, atol=0)
    assert not torch.equal(a[0, 7], b[0, 7])


def test_a_long_prompt_step_runs_the_eager_blocks():
    rt, _ = setup("llama", -1, 3)
    tokens = torch.randint(1, 128, (2, FUSED_PROMPT_ROWS // 2 + 1))
    prompt_step(rt, KVCache(rt.cache_shape(2)), tokens, None, 0, True, runs=False)
    prompt_step(rt, KVCache(rt.cache_shape(2)), tokens[:, :-1], None, 0, True, runs=True)


def test_eager_blocks_where_the_fused_step_does_not_apply(monkeypatch):
    model = tiny_quantized_model("llama", group_size=-1, bits=3)
    model.config.hidden_act = "gelu"  # the step's MLP is SiLU's
    gelu = runtime_of(model, 64)
    gelu.prepare(packed=True)
    assert gelu.fused is None
    rt, tokens = setup("llama", -1, 3)
    rt.prepare(packed=False)  # the fp32 path: nothing to fuse
    assert rt.fused is None
    rt.prepare(packed=True)
    assert rt.fused is not None
    slots = torch.tensor([0, 1, 2, 1])
    want = decode(rt, prefilled(rt, tokens, slots), next_tokens(tokens), slots)
    step = step_index(KVCache(rt.cache_shape(1)).shape, 0, torch.tensor([[1]]), decode=True)
    with torch.enable_grad():  # autograd (tuning): the eager blocks
        assert rt._fused_step(torch.zeros(1, 1, 64), step, None, None) is None
    rt.blocks[1].down.force_reference = True  # the reference path asked for: the eager blocks
    zero = torch.zeros(1, dtype=torch.long)
    assert rt.fused.step(torch.zeros(1, 64), torch.tensor([1]), zero, [], [], None) is None
    rt.blocks[1].down.force_reference = False
    rt.fused.stale = False
    rt.blocks[0].o.release()  # a plan rebuilt under the stack: the step falls back to eager
    assert rt.fused.step(torch.zeros(1, 64), torch.tensor([1]), zero, [], [], None) is None
    rt.blocks[0].o.prepare(torch.float32, int4=True, resident=False)
    got = decode(rt, prefilled(rt, tokens, slots), next_tokens(tokens), slots)
    scale = float(want.abs().max())
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=2e-3 * scale)
    torch.testing.assert_close(got[1:], want[1:], rtol=0, atol=2e-2 * scale)
    assert not torch.equal(got[1:], want[1:])  # the eager bag's fp16 sums: eager ran
    monkeypatch.setenv(cpu_build.SWITCH, "0")
    cpu_build.load.cache_clear()
    try:
        assert cpu_build.load() is None
        rt.prepare(packed=True)
        assert rt.fused is None
    finally:
        monkeypatch.undo()
        cpu_build.load.cache_clear()


def test_a_position_outside_the_cache_is_refused():
    rt, _ = setup("llama", -1, 3)
    cache = KVCache(rt.cache_shape(1))
    x, row = torch.zeros(1, 64), torch.zeros(1, dtype=torch.long)
    with pytest.raises(RuntimeError, match="position 64 outside the cache"):
        rt.fused.step(x, torch.tensor([64]), row, cache.k, cache.v, None)
    with pytest.raises(RuntimeError, match="cache row 1 out of range"):
        rt.fused.step(x, torch.tensor([3]), row + 1, cache.k, cache.v, None)
    with pytest.raises(RuntimeError, match="one cache row a row"):
        rt.fused.step(
            x, torch.tensor([3]), torch.zeros(2, dtype=torch.long), cache.k, cache.v, None
        )
    with pytest.raises(RuntimeError, match="slot 3 out of range"):  # 2 adapter slots
        rt.fused.step(x, torch.tensor([3]), row, cache.k, cache.v, torch.tensor([3]))
    with pytest.raises(RuntimeError, match="one slot a row"):
        two = row.expand(2)
        rt.fused.step(x.expand(2, -1), torch.tensor([3, 3]), two, cache.k, cache.v, torch.ones(1))
