"""The packed-attention paths on CUDA: masked SDPA and variable-length flash attention agree
(outputs and gradients, bf16 tolerance, fresh random inputs, documents of uneven lengths), no
token attends across a document, dropout is applied, and a forward and backward make no
device-to-host sync when the batch's CPU-side tensors come with it."""
import pytest
import torch

from gpu_common import needs_cuda
from pipeline.model import VARLEN, BertConfig, BertForMLM, cu_seqlens

pytestmark = [pytest.mark.gpu, needs_cuda]
needs_varlen = pytest.mark.skipif(VARLEN is None, reason="no variable-length flash kernel in this torch")
IMPLS = ["sdpa", pytest.param("varlen", marks=needs_varlen)]


def packed_batch(B: int, L: int, vocab: int, gen: torch.Generator):
    """Rows of documents with random, uneven lengths (1 token up to the whole row)."""
    seg = torch.zeros(B, L, dtype=torch.int32)
    for b in range(B):
        cuts = sorted(torch.randperm(L - 1, generator=gen)[:torch.randint(0, 6, (1,), generator=gen).item()] + 1)
        for c in cuts:
            seg[b, c:] += 1
    ids = torch.randint(1000, vocab, (B, L), generator=gen)
    labels = torch.full_like(ids, -100)
    pick = torch.rand(B, L, generator=gen) < 0.15
    labels[pick] = ids[pick]
    return ids, seg, labels


def model(attention_dropout=0.0, seed=0) -> BertForMLM:
    torch.manual_seed(seed)
    c = BertConfig(vocab_size=4096, hidden_size=256, heads=[4] * 3, ffn=[1024] * 3, head_size=64,
                   dropout=0.0, attention_dropout=attention_dropout, gates=True)
    return BertForMLM(c).cuda().to(torch.bfloat16)


@needs_varlen
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_varlen_matches_masked_sdpa(seed):
    gen = torch.Generator().manual_seed(seed)
    ids, seg, labels = packed_batch(8, 128, 4096, gen)
    ids, seg, labels = ids.cuda(), seg.cuda(), labels.cuda()
    outs = {}
    for impl in ("sdpa", "varlen"):
        m = model(seed=seed)
        m.set_attention(impl)
        m.l1 = 1e-4
        loss, n, _ = m(ids, segment_ids=seg, labels=labels)
        loss.backward()
        h = m.encode(ids, segment_ids=seg)
        outs[impl] = (loss.float(), h.float(), {k: p.grad.float() for k, p in m.named_parameters()})
    (la, ha, ga), (lb, hb, gb) = outs["sdpa"], outs["varlen"]
    assert torch.allclose(la, lb, rtol=2e-2)
    assert (ha - hb).abs().max() / ha.abs().max() < 3e-2
    for k in ga:
        if k.endswith("key.bias"):  # softmax ignores it: its gradient is 0 up to rounding in both paths
            assert ga[k].abs().max() < 1e-2 and gb[k].abs().max() < 1e-2
            continue
        cos = torch.nn.functional.cosine_similarity(ga[k].flatten(), gb[k].flatten(), dim=0)
        assert cos > 0.99, (k, cos.item())


@pytest.mark.parametrize("impl", IMPLS)
def test_no_attention_across_documents(impl):
    gen = torch.Generator().manual_seed(7)
    ids, seg, _ = packed_batch(2, 64, 4096, gen)
    seg[:, :20], seg[:, 20:] = 0, 1
    m = model().eval()
    m.set_attention(impl)
    with torch.no_grad():
        packed = m.encode(ids.cuda(), segment_ids=seg.cuda())[:, :20].float()
        alone = m.encode(ids[:, :20].cuda(), segment_ids=seg[:, :20].cuda()).float()
    assert (packed - alone).abs().max() / alone.abs().max() < 3e-2


def test_sdpa_applies_attention_dropout():
    gen = torch.Generator().manual_seed(3)
    ids, seg, _ = packed_batch(4, 128, 4096, gen)
    ids, seg = ids.cuda(), seg.cuda()
    m = model(attention_dropout=0.1).train()
    torch.manual_seed(0)
    a = m.encode(ids, segment_ids=seg)
    b = m.encode(ids, segment_ids=seg)
    assert not torch.equal(a, b)
    m.eval()
    assert torch.equal(m.encode(ids, segment_ids=seg), m.encode(ids, segment_ids=seg))


def test_varlen_without_dropout_kernel_refuses_dropout():
    from pipeline import model as M
    m = model(attention_dropout=0.1)
    if M.VARLEN_DROPOUT:
        m.set_attention("varlen")  # flash-attn: dropout supported
    else:
        with pytest.raises(ValueError, match="dropout"):
            m.set_attention("varlen")


@pytest.mark.parametrize("impl", IMPLS)
def test_training_step_has_no_host_sync(impl):
    gen = torch.Generator().manual_seed(5)
    ids, seg, labels = packed_batch(8, 128, 4096, gen)
    cu = cu_seqlens(seg)
    mlm_index = torch.nonzero(labels.reshape(-1) != -100).squeeze(1)
    batch = {k: v.pin_memory().cuda(non_blocking=True) for k, v in
             dict(input_ids=ids, segment_ids=seg, labels=labels, cu_seqlens=cu, mlm_index=mlm_index).items()}
    m = model()
    m.set_attention(impl)
    m.l1 = 1e-4
    m(**batch)[0].backward()  # warm-up: kernels chosen, workspaces allocated
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, n, correct = m(**batch)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert n == len(mlm_index)
