"""KnowledgeEditor and baselines on a tiny Llama that knows 80 real facts."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from editor.data import from_facts, load_counterfact, load_records, load_zsre
from editor.delta import Delta, DeltaError
from editor.analysis import update_parts
from editor.evaluate import _answers, evaluate, evaluate_sequential, known_gold
from editor.hypernet import HyperConfig, MatrixHead, condition_text, encode_conditions, load_editor
from editor.methods import EditRequest, make_method
from editor.train import TrainConfig, Trainer
from kbsync.errors import BadInput, KbsyncError, NotFound

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SMALL = HyperConfig(lstm_hidden=64, ffn_hidden=128, cond_dim=128, head_hidden=128)


def test_eq3_shapes_and_hand_checked_update():
    torch.manual_seed(0)
    head = MatrixHead(n=3, m=2, cfg=HyperConfig(cond_dim=4, head_hidden=5))
    h = torch.randn(4)
    grad = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])  # n x m, like W
    alpha, beta, gamma, delta, eta = head.coefficients(h)
    assert (alpha.shape, beta.shape, gamma.shape, delta.shape, eta.shape) == ((2,), (2,), (3,), (3,), ())
    dw = head(h, grad)
    assert dw.shape == grad.shape
    # Eq. 3 written out element by element.
    sa, sb, s = torch.softmax(alpha, 0), torch.softmax(beta, 0), torch.sigmoid(eta)
    for i in range(3):
        for j in range(2):
            want = s * (gamma[i] * sa[j] * grad[i, j] + delta[i] * sb[j])
            assert torch.allclose(dw[i, j], want, atol=1e-6)


def test_eq3_fixed_coefficients():
    head = MatrixHead(n=2, m=2, cfg=HyperConfig(cond_dim=1, head_hidden=1))
    with torch.no_grad():  # make the FFNN output constant: alpha=beta=0 -> softmax = 1/2; gamma=2, delta=4, eta=0
        head.net[-1].weight.zero_()
        head.net[-1].bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 2.0, 2.0, 4.0, 4.0, 0.0]))
    dw = head(torch.zeros(1), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    # 0.5 * (2 * 0.5 * g + 4 * 0.5) = 0.5 * g + 1
    assert torch.allclose(dw, torch.tensor([[1.5, 2.0], [2.5, 3.0]]))


def test_update_parts_tells_a_fixed_beta_hat_from_one_that_depends_on_the_fact(tiny_llama, facts, tmp_path):
    """update_parts: Eq. 3's terms add up to the update; beta_spread is 0 when beta_hat ignores the condition."""
    records = from_facts(facts)[:4]
    Trainer(tiny_llama, records, tmp_path, TrainConfig(steps=0), SMALL).save()
    net = load_editor(tmp_path / "editor.safetensors", tiny_llama)
    with torch.no_grad():  # beta and delta rows of each head's output layer: depend on h, then not
        for head in net.heads.values():
            rows = slice(head.m, 2 * head.m + 2 * head.n)  # beta [m], gamma [n], delta [n]
            head.net[-1].weight[rows].normal_(std=5.0)
    varying = update_parts(net, tiny_llama, records)
    with torch.no_grad():
        for head in net.heads.values():
            head.net[-1].weight[head.m:2 * head.m].zero_()
            head.net[-1].weight[2 * head.m + head.n:2 * head.m + 2 * head.n].zero_()
            head.net[-1].weight[-1].zero_()  # eta, which gates both terms
            head.net[-1].bias[head.m:2 * head.m + 2 * head.n].fill_(0.3)
    fixed = update_parts(net, tiny_llama, records)
    assert varying["beta_spread"] > 0.02 and fixed["beta_spread"] < 1e-4, (varying, fixed)
    assert fixed["beta_term"] > 0 and fixed["gradient_term"] > 0
    with torch.no_grad():  # alpha and gamma still depend on h (fixed's spread > 0); then nothing does
        for head in net.heads.values():
            head.net[-1].weight.zero_()
    assert fixed["head_spread"] > 1e-3 and update_parts(net, tiny_llama, records)["head_spread"] < 1e-6, fixed
    head = next(iter(net.heads.values()))
    h, grad = torch.randn(net.cfg.cond_dim), torch.randn(head.n, head.m)
    g, b = head.parts(h, grad)
    alpha, beta, gamma, delta, eta = head.coefficients(h)  # Eq. 3's two terms written out
    gate = torch.sigmoid(eta)
    assert torch.allclose(g, gate * torch.outer(gamma, torch.softmax(alpha, 0)) * grad, atol=1e-6)
    assert torch.allclose(b, gate * torch.outer(delta, torch.softmax(beta, 0)), atol=1e-6) and b.abs().max() > 0


def test_cond_norm_editor_normalises_h_and_round_trips(tiny_llama, facts, tmp_path):
    """cond_norm puts a LayerNorm on h (saved and loaded with the editor); without it h is the FFNN's raw output."""
    records = from_facts(facts)[:3]
    for on in (True, False):
        Trainer(tiny_llama, records, tmp_path / str(on), TrainConfig(steps=0),
                dataclasses.replace(SMALL, cond_norm=on, matrices=[])).save()
        net = load_editor(tmp_path / str(on) / "editor.safetensors", tiny_llama)
        ids, mask = encode_conditions(tiny_llama, [condition_text(r.original, r.target, r.prompt) for r in records], net.cfg.max_len)
        with torch.no_grad():
            h = net.encoder(ids, mask)
        assert net.cfg.cond_norm is on
        normalised = torch.allclose(h.mean(-1), torch.zeros(3), atol=1e-4) and torch.allclose(h.std(-1, unbiased=False), torch.ones(3), atol=1e-2)
        assert normalised is on, h.std(-1)


def test_tanh_encoder_bounds_h_and_older_editors_load_and_resume_as_mlp(tiny_llama, facts, tmp_path):
    """New editors squash h with tanh (the paper's code); a checkpoint written before encoder_out existed is an mlp editor."""
    records = from_facts(facts)[:3]
    texts = [condition_text(r.original, r.target, r.prompt) for r in records]
    for out in ("tanh", "mlp"):
        Trainer(tiny_llama, records, tmp_path / out, TrainConfig(steps=0), dataclasses.replace(SMALL, encoder_out=out, matrices=[])).save()
    old = tmp_path / "mlp" / "editor.safetensors"  # rewrite as an older file: no encoder_out in its config
    with safe_open(str(old), "pt") as f:
        meta = f.metadata()
    cfg = json.loads(meta["config"])
    del cfg["encoder_out"]
    save_file(load_file(str(old)), str(old), metadata={**meta, "config": json.dumps(cfg)})
    ids, mask = encode_conditions(tiny_llama, texts, 96)
    peak = {}
    for out in ("tanh", "mlp"):
        net = load_editor(tmp_path / out / "editor.safetensors", tiny_llama)
        assert net.cfg.encoder_out == out
        with torch.no_grad():
            for layer in net.encoder.ffn:  # blow up every linear layer: only tanh keeps h in [-1, 1]
                if isinstance(layer, torch.nn.Linear):
                    layer.weight.mul_(100)
            peak[out] = net.encoder(ids, mask).abs().max().item()
    assert peak["tanh"] <= 1.0 < peak["mlp"], peak
    resumed = Trainer(tiny_llama, records, tmp_path / "mlp", TrainConfig(steps=0), SMALL)  # SMALL asks for tanh
    saved = load_file(str(old))
    assert resumed.net.cfg.encoder_out == "mlp"
    assert all(torch.equal(v, saved[k]) for k, v in resumed.net.state_dict().items() if k in saved)
    with pytest.raises(KbsyncError, match="encoder_out"):
        Trainer(tiny_llama, records, tmp_path / "bad", TrainConfig(steps=0), dataclasses.replace(SMALL, encoder_out="relu"))


def test_head_weight_norm_editor_round_trips(tiny_llama, facts, tmp_path):
    """head_weight_norm (the paper code's weight-normed heads) is saved and loaded with the same update."""
    records = from_facts(facts)[:2]
    t = Trainer(tiny_llama, records, tmp_path, TrainConfig(steps=1, batch=2, checkpoint_every=1),
                dataclasses.replace(SMALL, head_weight_norm=True, matrices=[]))
    t.run()
    net = load_editor(tmp_path / "editor.safetensors", tiny_llama)
    head, name = net.head(net.names[0]), net.names[0]
    assert net.cfg.head_weight_norm and hasattr(head.net[0], "parametrizations")
    h, grad = torch.randn(net.cfg.cond_dim), torch.randn(head.n, head.m)
    with torch.no_grad():
        assert torch.equal(head(h, grad), t.net.head(name)(h, grad)) and head(h, grad).abs().max() > 0


def test_delta_apply_remove_is_bit_exact_and_round_trips(tiny_llama, tmp_path):
    before = {n: p.detach().clone() for n, p in tiny_llama.model.named_parameters()}
    delta = Delta({n: torch.randn_like(p) * 1e-3 for n, p in tiny_llama.editable().items()}, {"why": "test"})
    delta.apply(tiny_llama.model)
    changed = [n for n, p in tiny_llama.model.named_parameters() if not torch.equal(p, before[n])]
    assert sorted(changed) == sorted(delta.tensors)
    delta.remove(tiny_llama.model)
    assert all(torch.equal(p, before[n]) for n, p in tiny_llama.model.named_parameters())
    sha = delta.save(tmp_path / "d.safetensors")
    loaded = Delta.load(tmp_path / "d.safetensors", sha)
    assert loaded.meta == {"why": "test"} and all(torch.equal(loaded.tensors[n], t) for n, t in delta.tensors.items())
    raw = bytearray((tmp_path / "d.safetensors").read_bytes())
    raw[-3] ^= 0xFF
    (tmp_path / "d.safetensors").write_bytes(bytes(raw))
    with pytest.raises(DeltaError, match="sha256"):
        Delta.load(tmp_path / "d.safetensors", sha)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DeltaError, match="corrupt"):
        Delta.load(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("method", ["ft-layer", "ft-all", "zhu"])
def test_each_baseline_flips_the_prediction(tiny_llama, facts, method):
    fact = facts[0]
    from kbsync.facts import render

    q = render(fact).question
    before = {n: p.detach().clone() for n, p in tiny_llama.model.named_parameters()}
    target = next(f.object.label for f in facts if f.property == fact.property and f.object.label != fact.object.label)
    assert tiny_llama.predict([q])[0] == fact.object.label
    m = make_method(method, tiny_llama, lr=1e-3, max_steps=60, linf=5e-3) if method == "zhu" else make_method(method, tiny_llama, lr=1e-3, max_steps=60)
    result = m.edit(EditRequest(q, target))
    # the live model is untouched by edit(); the delta carries the change
    assert all(torch.equal(p, before[n]) for n, p in tiny_llama.model.named_parameters())
    assert result.success and result.steps <= 60
    result.delta.apply(tiny_llama.model)
    try:
        assert tiny_llama.predict([q])[0] == target
    finally:
        result.delta.remove(tiny_llama.model)
    if method == "zhu":
        assert max(float(t.abs().max()) for t in result.delta.tensors.values()) <= 5e-3 + 1e-6


@pytest.mark.parametrize("loops", [2, 3])  # 2: the hurtful application is the last; 3: the next one sees it
def test_loop_takes_back_an_application_that_raises_the_loss(tiny_llama, facts, tmp_path, monkeypatch, loops):
    """+loop keeps re-applications that lower the new fact's loss and undoes the first that does not."""
    import editor.hypernet as hn

    Trainer(tiny_llama, from_facts(facts)[:4], tmp_path, TrainConfig(steps=0), SMALL).save()
    method = make_method("ke-loop", tiny_llama, checkpoint=tmp_path / "editor.safetensors", loop=loops)
    req = EditRequest("What is the capital of France?", "Tokyo", original="Paris")
    # The hyper-network's output replaced by a tiny descent step, then a large ascent step (the
    # second application), so that which application hurts is known in advance.
    proposed = []

    def steered(net, adapter, request, params=None):
        loss, grads = hn.edit_loss_and_gradients(adapter, request.prompt, request.taught, request.question, 0.0, params)
        sign = 1e2 if len(proposed) == 1 else -1e-4
        proposed.append({n: sign * g for n, g in grads.items()})
        return proposed[-1], loss

    monkeypatch.setattr(hn, "predict_delta", steered)
    result = method.edit(req)
    losses = result.info["target_losses"]
    assert not result.success and result.steps == 1 and len(losses) == 3, result
    assert losses[2] > losses[1] and losses[1] < losses[0], losses
    assert all(torch.equal(result.delta.tensors[n], proposed[0][n]) for n in proposed[0])


def test_evaluate_hands_over_every_methods_rows_after_each_record(tiny_llama, facts):
    """A long evaluation can stop any time: after each record, on_row sees every method on the records so far."""
    seen, states = [], []

    def on_row(rows, state):
        seen.append([(r["method"], r["n"]) for r in rows])
        states.append(copy.deepcopy(state))

    records, methods = from_facts(facts)[:2], ["ft-layer", "zhu"]
    options = {"ft-layer": {"lr": 1e-3}, "zhu": {"lr": 1e-3, "linf": 0.0, "max_steps": 4}}
    rows = evaluate(tiny_llama, records, methods, options, on_row=on_row)
    assert seen == [[("ft-layer", 1), ("zhu", 1)], [("ft-layer", 2), ("zhu", 2)]]
    assert [(r["method"], r["n"]) for r in rows] == seen[-1]
    # Resumed from the state after the first record: only the second is edited, and the rows are the same.
    edited = []
    again = evaluate(tiny_llama, records, methods, options, resume=states[0], on_edit=lambda m, i: edited.append(i))
    assert edited == [1, 1]
    timeless = lambda rows: [{k: v for k, v in r.items() if k != "latency_s"} for r in rows]  # noqa: E731
    assert timeless(again) == timeless(rows)
    with pytest.raises(ValueError, match="other methods"):
        evaluate(tiny_llama, records, ["zhu", "ft-layer"], options, resume=states[0])
    # Zhu projected onto a ball of radius 0 changes nothing: every retain answer token kept, KL 0.
    zero = rows[1]
    assert zero["success_em"] == 0 and zero["retain_tf"] == 1.0 and zero["retain_acc"] == 1.0 and zero["retain_kl"] == 0, zero
    assert 0 <= rows[0]["retain_tf"] <= 1 and rows[0]["success_em"] == 1.0, rows[0]


def test_sequential_evaluation_stacks_the_edits_and_restores_the_model(tiny_llama, facts):
    """--sequential: each edit on the model as edited so far; a prompt edited twice counts at its last edit."""
    before = {n: p.detach().clone() for n, p in tiny_llama.model.named_parameters()}
    recs = from_facts(facts, n_retain=4, seed=0)
    first = recs[0]
    second = next(r for r in recs[1:] if r.target not in (first.target, first.original))
    again = dataclasses.replace(first, target=second.target)  # the first prompt once more, to another target
    records = [first, second, again]
    seen = []
    rows = evaluate_sequential(tiny_llama, records, ["ft-layer"], {"ft-layer": {"lr": 1e-3}},
                               on_edit=lambda m, i: seen.append(i))
    row = rows[0]
    assert seen == [0, 1, 2] and row["n"] == 3
    assert all(torch.equal(p, before[n]) for n, p in tiny_llama.model.named_parameters())
    # All three took when made; at the end the first prompt answers its second target, so over the
    # last edit of each prompt (second, again) both are kept, and the superseded one is not counted.
    assert row["success_em"] == 1.0 and row["kept_em"] == 1.0, row
    # Retain: the records' retain prompts less the two edited ones; scored against the unedited model.
    edited = {first.prompt, second.prompt}
    expected = {p for r in records for p, _ in r.retain} - edited
    assert row["retain_n"] == len(expected) > 0 and 0 <= row["retain_acc"] <= 1 and 0 <= row["retain_tf"] <= 1, row
    # A method that changes nothing keeps every retain answer and token, and takes no edit.
    zero = evaluate_sequential(tiny_llama, records, ["zhu"], {"zhu": {"lr": 1e-3, "linf": 0.0, "max_steps": 2}})[0]
    assert zero["success_em"] == 0 and zero["retain_acc"] == 1.0 and zero["retain_tf"] == 1.0, zero
    assert zero["deterioration"] == 0.0, zero


def test_a_stacked_run_cut_short_carries_on_from_its_saved_deltas(tiny_llama, facts, tmp_path):
    """state_dir: a second run replays the saved deltas (no new proposals) and carries on; same scores, curve per checkpoint."""
    from editor.evaluate import run_sequential, sequential_baseline
    from editor.methods import make_method

    before = {n: p.detach().clone() for n, p in tiny_llama.model.named_parameters()}
    records = from_facts(facts, n_retain=2, seed=0)[:4]
    base = sequential_baseline(tiny_llama, records)
    full = run_sequential(tiny_llama, make_method("ft-layer", tiny_llama, lr=1e-3), base, checkpoints=(2,))
    assert [c["edits"] for c in full["curve"]] == [2, 4] and full["curve"][-1]["kept_em"] == full["kept_em"]

    class Stop(Exception):
        pass

    def stop_after_two(name, i):
        if i == 1:
            raise Stop

    state = tmp_path / "run"
    with pytest.raises(Stop):
        run_sequential(tiny_llama, make_method("ft-layer", tiny_llama, lr=1e-3), base, on_edit=stop_after_two,
                       checkpoints=(2,), state_dir=state)
    assert sorted(p.name for p in state.glob("*.safetensors")) == ["00000.safetensors", "00001.safetensors"]
    assert all(torch.equal(p, before[n]) for n, p in tiny_llama.model.named_parameters())
    proposed = []
    method = make_method("ft-layer", tiny_llama, lr=1e-3)
    real = method.propose
    method.propose = lambda req: proposed.append(req.prompt) or real(req)  # counts the proposals the run makes
    resumed = run_sequential(tiny_llama, method, base, checkpoints=(2,), state_dir=state)
    assert proposed == [r.prompt for r in records[2:]]
    assert {k: resumed[k] for k in ("success_em", "kept_em", "retain_acc")} == {k: full[k] for k in ("success_em", "kept_em", "retain_acc")}
    assert [c["edits"] for c in resumed["curve"]] == [2, 4]
    assert all(torch.equal(p, before[n]) for n, p in tiny_llama.model.named_parameters())


def test_sequential_retain_answers_are_asked_in_chunks_with_the_same_result(tiny_llama, facts):
    """A stacked run's retain set is asked chunk by chunk; the answers match one batch, in order."""
    prompts = [r.prompt for r in from_facts(facts)][:7]
    assert _answers(tiny_llama, prompts, True, chunk=3) == tiny_llama.predict(prompts) and len(prompts) == 7
    assert _answers(tiny_llama, [], True) == []


def test_known_gold_keeps_the_pairs_the_unedited_model_answers(tiny_llama, facts):
    """Deterioration's gold set: pairs the model gets right, in order, at most n, among at most scan*n pairs."""
    right = [(r.prompt, r.original) for r in from_facts(facts)]
    wrong = [(p, "Atlantis") for p, _ in right[:3]]
    got = known_gold(tiny_llama, wrong + right, 4, True, chunk=2)
    assert len(got) == 4 and all(a != "Atlantis" for _, a in got), got
    assert got == [pair for pair in right if pair in got][:4] and got[0] in right[:3]
    assert known_gold(tiny_llama, wrong, 2, True) == []
    assert known_gold(tiny_llama, wrong + right, 1, True, scan=3) == []  # only the 3 wrong pairs are looked at


def test_unknown_method_and_missing_editor(tiny_llama, tmp_path):
    with pytest.raises(NotFound, match="unknown edit method"):
        make_method("rome", tiny_llama)
    with pytest.raises(NotFound, match="kbsync editor train.*--method alphaedit"):
        make_method("ke", tiny_llama, data_dir=tmp_path)


def test_multiplier_rises_when_violated_and_stays_nonnegative(tiny_llama, facts, tmp_path):
    records = from_facts(facts[:20], seed=1)
    tight = Trainer(tiny_llama, records, tmp_path / "tight", TrainConfig(steps=4, batch=2, margin=0.0, lr=1e-2), SMALL)
    prev = 0.0
    for _ in range(4):
        m = tight.train_step()
        # gradient ascent on the multiplier: lam <- max(0, lam + lr * (C - m)), so it rises while C > m
        assert m["lambda"] == pytest.approx(max(0.0, prev + tight.cfg.lagrange_lr * m["constraint"]))
        assert m["lambda"] >= prev
        prev = m["lambda"]
    assert prev > 0
    loose = Trainer(tiny_llama, records, tmp_path / "loose", TrainConfig(steps=3, batch=2, margin=1e6), SMALL)
    assert all(loose.train_step()["lambda"] == 0.0 for _ in range(3))


def test_multiplier_start_and_batch_retain_options(tiny_llama, facts, tmp_path):
    records = from_facts(facts[:20], seed=5)
    start = Trainer(tiny_llama, records, tmp_path / "start", TrainConfig(steps=1, batch=2, lagrange_init=1.0, margin=1e6), SMALL)
    assert start.lam == 1.0 and start.train_step()["lambda"] == 0.0  # ascent from 1 on a slack constraint
    wide = Trainer(tiny_llama, records, tmp_path / "wide", TrainConfig(steps=1, batch=4, batch_retain=True, margin=0.0), SMALL)
    for head in wide.net.heads.values():  # a visible first update (the default init makes it ~0, KL ~1e-8 rounding)
        torch.nn.init.normal_(head.net[-1].weight, std=0.05)
    m = wide.train_step()
    assert m["constraint"] > 0 and m["lambda"] == pytest.approx(wide.cfg.lagrange_lr * m["constraint"])


def test_l2_constraint_variant_is_the_parameter_norm(tiny_llama, facts, tmp_path):
    records = from_facts(facts[:10], seed=2)
    t = Trainer(tiny_llama, records, tmp_path / "l2", TrainConfig(steps=1, batch=2, constraint="l2", margin=0.0), SMALL)
    m = t.train_step()
    assert m["constraint"] > 0 and m["lambda"] == pytest.approx(t.cfg.lagrange_lr * m["constraint"])


def test_training_resumes_after_interruption(tiny_llama, facts, tmp_path):
    records = from_facts(facts[:20], seed=3)
    cfg = TrainConfig(steps=4, batch=2, checkpoint_every=2, eval_every=2)
    Trainer(tiny_llama, records, tmp_path / "run", cfg, SMALL).run()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4
    again = Trainer(tiny_llama, records, tmp_path / "run", TrainConfig(steps=6, batch=2, checkpoint_every=2, eval_every=2), SMALL)
    assert again.step == 4
    again.run()
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 6
    net = load_editor(tmp_path / "run" / "editor.safetensors", tiny_llama)
    state = again.net.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())  # the checkpoint is the trained net
    with safe_open(str(tmp_path / "run" / "editor.safetensors"), "pt") as f:
        # The LSTM's embeddings are frozen (a copy of the model's): not stored, rebuilt from the model.
        assert "encoder.embed.weight" not in f.keys() and "encoder.lstm.weight_ih_l0" in f.keys()
    assert torch.equal(net.encoder.embed.weight, tiny_llama.model.get_input_embeddings().weight)


def test_checkpoint_for_other_matrices_is_refused(tiny_llama, facts, tmp_path):
    records = from_facts(facts[:10], seed=4)
    Trainer(tiny_llama, records, tmp_path / "r", TrainConfig(steps=1, batch=2, checkpoint_every=1), SMALL).run()
    other = copy.copy(tiny_llama)
    other.edit_layers = "0"
    with pytest.raises(KbsyncError, match="edit_layers"):
        load_editor(tmp_path / "r" / "editor.safetensors", other)


# Session, not module: xdist sends both tests of the group to one worker but not one after the other,
# and a module fixture is torn down when the worker runs another module in between (it was trained twice).
@pytest.fixture(scope="session")
def trained_editor(tiny_llama, facts, tmp_path_factory):
    """A hyper-network trained for ~1.5 minutes (750 steps) on counterfactual edits of the tiny model's facts.

    750, not 1000: the fixture is the suite's longest step (CI runs it on one worker while the other
    does the rest). At 750 the test's claims hold with 0.03-0.04 to spare: ke-loop success 0.938,
    ke-loop+shrink paraphrases 0.935 vs ft-all 0.756 (+0.15 asserted); at 500 the paraphrase claim fails (0.881).
    """
    out = tmp_path_factory.mktemp("ke")
    train = from_facts(facts, per_fact=3, seed=0)
    Trainer(tiny_llama, train, out, TrainConfig(steps=750, batch=8, lr=1e-3, eval_every=250, checkpoint_every=750),
            SMALL).run()
    return out / "editor.safetensors"


@pytest.mark.xdist_group("trained_editor")  # scripts/test.sh runs --dist loadgroup: the fixture is trained once
def test_trained_ke_edits_unseen_targets_and_keeps_retain(tiny_llama, facts, trained_editor, tmp_path):
    test = from_facts(facts, per_fact=1, seed=123)[:48]  # other (fact, target) pairs than in training
    # An editor with the same architecture but no training, as the reference point.
    Trainer(tiny_llama, test, tmp_path / "untrained", TrainConfig(steps=0), SMALL).save()
    untrained = tmp_path / "untrained" / "editor.safetensors"
    ke = {"checkpoint": trained_editor}
    rows = {r["method"]: r for r in evaluate(
        tiny_llama, test, ["ke", "ke+shrink", "ke-loop", "ke-loop+shrink", "ft-all"],
        {"ke": ke, "ke-loop": {**ke, "loop": 5}, "ft-all": {"lr": 1e-5, "max_steps": 100}},
    )}
    base = evaluate(tiny_llama, test, ["ke"], {"ke": {"checkpoint": untrained}})[0]
    assert rows["ke"]["success_em"] > base["success_em"] + 0.5, (rows, base)
    assert rows["ke"]["retain_acc"] >= 0.85 and rows["ke"]["retain_kl"] < 0.2, rows
    assert rows["ke-loop"]["success_em"] >= max(0.9, rows["ke"]["success_em"]), rows
    # Shrinking keeps what flipped and moves the other facts less.
    for name in ("ke", "ke-loop"):
        shrunk = rows[f"{name}+shrink"]
        assert shrunk["success_em"] == rows[name]["success_em"] and shrunk["scale"] < 1, rows
        assert shrunk["retain_kl"] < rows[name]["retain_kl"] and shrunk["retain_acc"] >= rows[name]["retain_acc"], rows
    # The paper's Table 1 claims, as kbsync edits (shrink on): with +loop KnowledgeEditor reaches >= 90%
    # success and generalises to paraphrases far better than fine-tuning all layers (RMSProp, lr 1e-5,
    # until the answer flips). On retain it is close, not better, on this tiny model: over every other
    # fact (3,792 answers) KE+shrink keeps 0.985-0.994, ft-all 0.997 (benchmarks/RESULTS.md, "The
    # paper's encoder"); asserted here, on 192 answers: within 2 points.
    assert rows["ke-loop+shrink"]["success_em"] >= 0.9, rows
    assert rows["ke-loop+shrink"]["equiv_em"] >= 0.85 and rows["ke-loop+shrink"]["equiv_em"] > rows["ft-all"]["equiv_em"] + 0.15, rows
    assert rows["ke+shrink"]["retain_acc"] >= rows["ft-all"]["retain_acc"] - 0.02, rows


@pytest.mark.xdist_group("trained_editor")
def test_an_editor_trained_on_sequences_keeps_more_of_20_stacked_edits(tiny_llama, facts, trained_editor, tmp_path):
    """editor train --sequence 10 for 250 steps against the paper's objective for 750 (the fixture).

    Measured (benchmarks/RESULTS.md, "KnowledgeEditor trained on sequences"): stacked, the
    single-edit editor's 20 edits keep none of themselves and no retain answer (its updates add
    up to a broken model); the sequence editor's keep 0.2 of the edits and 0.47 of the retain
    answers after 250 steps (0.2-0.3 and 0.58-0.63 after 400, which cost the suite a minute more).
    """
    from editor.evaluate import evaluate_sequential

    out = tmp_path / "sequence"
    Trainer(tiny_llama, from_facts(facts, per_fact=3, seed=0), out,
            TrainConfig(steps=250, batch=8, lr=1e-3, eval_every=250, checkpoint_every=250, sequence=10, lookback=2),
            SMALL).run()
    test = from_facts(facts, per_fact=1, seed=123)[:20]
    single, sequence = (evaluate_sequential(tiny_llama, test, ["ke"], {"ke": {"checkpoint": str(path)}})[0]
                        for path in (trained_editor, out / "editor.safetensors"))
    assert sequence["kept_em"] >= single["kept_em"] + 0.1, (single, sequence)
    assert sequence["retain_acc"] >= single["retain_acc"] + 0.3, (single, sequence)


def test_zsre_loader_handles_empty_fields_and_alt_in_answers(tmp_path):
    recs = [
        {"subject": "A", "src": "What is A?", "pred": "x", "rephrase": "A is what?", "alt": "y", "answers": ["x"],
         "loc": "nq question: who wrote b", "loc_ans": "c", "cond": ""},
        {"subject": "B", "src": "What is B?", "pred": "p", "rephrase": "", "alt": "", "answers": ["p"], "loc": "", "loc_ans": "", "cond": ""},
        {"subject": "C", "src": "What is C?", "pred": "q", "rephrase": "C?", "alt": "q", "answers": ["q"], "loc": "nq question: d", "loc_ans": "e", "cond": ""},
    ]
    p = tmp_path / "zsre.json"
    p.write_text(json.dumps(recs))
    out = load_zsre(p)
    assert [r.target for r in out] == ["y", "q"]
    assert out[0].retain == [("who wrote b", "c")] and out[0].paraphrases == ["A is what?"]
    with pytest.raises(NotFound):
        load_records(f"zsre:{tmp_path / 'missing.json'}")


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/data is not present on this machine")
def test_real_counterfact_and_zsre_files_load():
    cf = load_counterfact(SHARED / "counterfact-val.json", limit=50)
    assert len(cf) == 50 and all(r.target and r.paraphrases and r.retain and not r.question for r in cf)
    zs = load_zsre(SHARED / "zsre_mend_train-1k.json")
    assert 990 <= len(zs) <= 1000 and all(r.question and r.target for r in zs)


def test_table_records_and_grounding_on_the_model_own_answers(tiny_llama, tmp_path):
    from editor.data import ground

    records = load_records("table:P36,P38", limit=6)
    assert len(records) == 6 and {r.prompt for r in records} == {r.prompt for r in load_records("table:P36,P38", limit=6)}
    capitals = {r.prompt for r in load_records("table:P36")}
    for r in records:
        assert len(r.retain) == 4 and r.target != r.original and r.target in r.alternatives
        own = capitals if r.prompt in capitals else {r2.prompt for r2 in load_records("table:P38")}
        assert sum(q in own for q, _ in r.retain) >= 2  # two neighbours of the edited property
    with pytest.raises(BadInput, match="no facts in the table for properties P999"):
        load_records("table:P999")
    cache = tmp_path / "answers.json"
    grounded = ground(tiny_llama, records, cache=cache)
    said = tiny_llama.predict([r.prompt for r in records])
    assert [g.original for g in grounded] == said and [g.target for g in grounded] == [r.target for r in records]
    assert [a for _, a in grounded[0].retain] == tiny_llama.predict([q for q, _ in records[0].retain])
    assert cache.exists() and ground(tiny_llama, records, cache=cache) == grounded  # the cached answers


def test_beam_targets_are_the_model_own_other_likely_answers(tiny_llama, facts):
    """--targets beam: new targets are beam hypotheses other than the model's answer, originals and retain kept."""
    from editor.data import beam_targets, ground

    records = ground(tiny_llama, from_facts(facts, seed=0)[:4])
    out = beam_targets(tiny_llama, records, k=2)
    assert out, "the tiny model's beam search gave no alternative answer"
    for r in out:
        src = next(x for x in records if x.prompt == r.prompt)
        hyps = tiny_llama.hypotheses(r.prompt, 3)
        assert r.target in hyps and r.target.lower() != src.original.lower(), (r.target, hyps, src.original)
        assert (r.original, r.retain, r.answer) == (src.original, src.retain, "")
    assert all(sum(r.prompt == x.prompt for r in out) <= 2 for x in records)


def test_beam_targets_of_a_chat_answer_are_its_object():
    """A hypothesis echoing the claim prefix is trained as its object, the sentence as the styled answer."""
    from editor.data import _object_of

    assert _object_of("The capital of Peru is Cusco.", "The capital of Peru is") == "Cusco"
    assert _object_of("Cusco, a city", "The capital of Peru is") == "Cusco, a city"


def test_claim_style_records_teach_the_statement():
    bare = load_records("table:P36", limit=3)
    claim = load_records("table:P36", limit=3, answer_style="claim")
    assert [r.target for r in claim] == [r.target for r in bare] and all(r.taught == r.target for r in bare)
    for r in claim:
        subject = r.prompt.removeprefix("What is the capital of ").removesuffix("?")
        assert r.taught == r.answer == f"The capital of {subject} is {r.target}."


def test_claim_records_carry_the_claim_prefix_for_the_match_rules():
    from kbsync.match import match

    [r] = load_records("table:P36", limit=1, answer_style="claim")
    assert r.claim_prefix and r.answer.startswith(r.claim_prefix)
    assert match(r.answer, r.target, (), r.claim_prefix).ok  # the model saying the claim is a success


def test_shrink_finds_the_smallest_scale_that_keeps_the_edit(tiny_llama, facts):
    from dataclasses import replace

    from editor.shrink import holding, holding_all, shrink, shrink_joint
    from kbsync.facts import render

    fact = facts[0]
    q = render(fact).question
    target = next(f.object.label for f in facts if f.property == fact.property and f.object.label != fact.object.label)
    req = EditRequest(q, target)
    full = make_method("ft-layer", tiny_llama, lr=1e-3, max_steps=60).edit(req)
    assert full.success
    big = replace(full, delta=full.delta.scaled(4.0))  # an overshooting delta: a quarter of it is enough
    out = shrink(tiny_llama, req, big)
    scale, below = out.info["scale"], out.info["scale_below"]
    assert 0 < scale <= 0.25 and scale - below <= 0.05
    assert 0 in holding(tiny_llama, req, out.delta)  # the returned delta still flips the answer
    assert 0 not in holding(tiny_llama, req, big.delta.scaled(below))  # and the bracket's lower end does not
    assert all(torch.equal(out.delta.tensors[n], t * scale) for n, t in big.delta.tensors.items())
    # make_method's NAME+shrink and the shrink option: the same shrunk proposal through propose()
    proposed = make_method("ft-layer+shrink", tiny_llama, lr=1e-3, max_steps=60).propose(req)
    assert proposed.success and 0 < proposed.info["scale"] <= 1 and out.delta.meta == {**big.delta.meta, "scale": scale}
    # The delta file says at what scale it was applied and what it taught (a joint re-solve reads both).
    assert proposed.delta.meta["scale"] == proposed.info["scale"] and EditRequest.from_dict(proposed.delta.meta["request"]) == req
    # A joint delta of several facts: one scale for all, the smallest keeping every prompt it holds.
    together, joint_scale = shrink_joint(tiny_llama, [req], big.delta)
    assert joint_scale == scale and together.meta["scale"] == scale and (0, 0) in holding_all(tiny_llama, [req], together)
    unshrunk = make_method("ft-layer", tiny_llama, lr=1e-3, max_steps=60, shrink="false").propose(req)
    assert "scale" not in unshrunk.info
    # an edit that did not flip is returned as it is
    none = replace(full, delta=full.delta.scaled(0.0), success=True)
    assert shrink(tiny_llama, req, none) is none
