"""Fine-tuning the encoder under frozen heads (evaluation/finetune.py): the loss falls, only the
encoder trains, a seed fixes the run."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from helpers_models import tiny_bert_encoder
from tiesmerge.evaluation.encoder import build_head
from tiesmerge.evaluation.finetune import TrainConfig, finetune

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


FT_DATA = {
    "animals": [("the cat sat", 0), ("a cat ran", 0), ("cat on a mat", 0), ("the old cat", 0),
                ("the dog sat", 1), ("a dog ran", 1), ("dog on a mat", 1), ("the old dog", 1)],
    "weather": [("cold rain", 0), ("snow at night", 0), ("cold snow", 0), ("rain and snow", 0),
                ("warm sun", 1), ("sun on a day", 1), ("warm day", 1), ("the sun", 1)],
}


FT_DESCRIPTIONS = {"animals": ["a cat", "a dog"], "weather": ["cold", "warm"]}


FT_CONFIG = TrainConfig(epochs=4, lr=3e-3, batch_size=4, warmup_fraction=0.1, seed=3)


def _ft_setup(tokenizer):
    enc = tiny_bert_encoder(tokenizer, seed=5)
    heads = {t: build_head(enc, d) for t, d in FT_DESCRIPTIONS.items()}
    return enc, heads


@torch.no_grad()
def _dataset_loss(enc, heads) -> float:
    enc.eval()
    losses = []
    for task, rows in FT_DATA.items():
        emb = enc.encode([t for t, _ in rows])
        labels = torch.tensor([y for _, y in rows])
        losses.append(torch.nn.functional.cross_entropy(heads[task].logits(emb), labels))
    return float(torch.stack(losses).mean())


def test_finetune_lowers_loss_and_trains_only_the_encoder(bert_tokenizer):
    enc, heads = _ft_setup(bert_tokenizer)
    head_before = {t: h.class_embeddings.clone() for t, h in heads.items()}
    weights_before = {k: v.clone() for k, v in enc.state_dict().items()}
    loss_before = _dataset_loss(enc, heads)
    steps = []
    log = finetune(enc, heads, FT_DATA, FT_CONFIG, on_step=lambda s, total, loss: steps.append((s, total, loss)))
    # 2 tasks x 8 examples / batch 4 = 4 batches per epoch
    assert log.steps == 4 * 4 == len(steps)
    assert log.examples == 4 * 16
    assert [s for s, _, _ in steps] == list(range(1, 17)) and {t for _, t, _ in steps} == {16}
    assert log.final_loss == steps[-1][2]
    assert not enc.training
    loss_after = _dataset_loss(enc, heads)
    assert loss_after < 0.7 * loss_before, (loss_before, loss_after)
    first_epoch = sum(x for _, _, x in steps[:4]) / 4
    last_epoch = sum(x for _, _, x in steps[-4:]) / 4
    assert last_epoch < first_epoch
    for t, h in heads.items():
        assert torch.equal(h.class_embeddings, head_before[t])
        assert not h.class_embeddings.requires_grad
    changed = [k for k, v in enc.state_dict().items() if not torch.equal(v, weights_before[k])]
    assert any("encoder.layer.0" in k for k in changed) and any("embeddings" in k for k in changed)


def test_finetune_is_deterministic_for_a_seed(bert_tokenizer):
    config = TrainConfig(epochs=2, lr=3e-3, batch_size=4, seed=3)
    enc, heads = _ft_setup(bert_tokenizer)
    twin, other = copy.deepcopy(enc), copy.deepcopy(enc)
    torch.manual_seed(111)  # the global RNG differs between the runs: finetune must seed its own
    finetune(enc, heads, FT_DATA, config)
    torch.manual_seed(222)
    finetune(twin, heads, FT_DATA, config)
    a, b = enc.state_dict(), twin.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # another seed trains differently (dropout and batch order depend on it)
    finetune(other, heads, FT_DATA, dataclasses.replace(config, seed=4))
    assert any(not torch.equal(a[k], v) for k, v in other.state_dict().items())


def test_early_stopping_keeps_the_best_epoch_and_records_the_curve(bert_tokenizer):
    enc, heads = _ft_setup(bert_tokenizer)
    scores = iter([0.5, 0.8, 0.6, 0.7, 0.9])  # epoch 2 is best until 2 stale epochs stop the run
    snapshots = []

    def validate(encoder):
        assert not encoder.training  # scored in eval mode (no dropout)
        snapshots.append({k: v.clone() for k, v in encoder.state_dict().items()})
        return next(scores)

    epochs = []
    config = dataclasses.replace(FT_CONFIG, epochs=5, patience=2)
    log = finetune(enc, heads, FT_DATA, config, validate=validate, on_epoch=epochs.append)
    assert [r.epoch for r in log.curve] == [1, 2, 3, 4] and list(log.curve) == epochs
    assert [r.validation for r in log.curve] == [0.5, 0.8, 0.6, 0.7]
    assert log.best_epoch == 2 and log.best_validation == 0.8
    assert log.steps == 4 * 4  # 4 epochs of 4 batches ran; the fifth never started
    assert all(r.train_loss > 0 and r.seconds > 0 for r in log.curve)
    assert log.curve[-1].train_loss < log.curve[0].train_loss
    state = enc.state_dict()
    assert all(torch.equal(state[k], snapshots[1][k]) for k in state)  # epoch 2's weights, not epoch 4's
    assert not all(torch.equal(state[k], snapshots[3][k]) for k in state)
    assert not enc.training


def test_without_patience_every_epoch_runs_and_a_last_best_is_kept(bert_tokenizer):
    enc, heads = _ft_setup(bert_tokenizer)
    scores = iter([0.9, 0.1, 0.95])
    log = finetune(enc, heads, FT_DATA, dataclasses.replace(FT_CONFIG, epochs=3), validate=lambda e: next(scores))
    assert len(log.curve) == 3 and log.best_epoch == 3 and log.best_validation == 0.95
    plain = finetune(_ft_setup(bert_tokenizer)[0], heads, FT_DATA, dataclasses.replace(FT_CONFIG, epochs=2))
    assert plain.best_epoch is None and [r.validation for r in plain.curve] == [None, None]
    with pytest.raises(ValueError, match="patience"):
        finetune(enc, heads, FT_DATA, dataclasses.replace(FT_CONFIG, patience=-1))


class _Killed(Exception):
    pass


def _interrupted_run(tokenizer, tmp_path, *, at: int = 2, config=FT_CONFIG, **kwargs):
    """A run killed at step ``at``, its checkpoint saved after each step: (encoder, heads, checkpoint path)."""
    enc, heads = _ft_setup(tokenizer)
    ck = tmp_path / "ck.pt"

    def stop(step, total, loss):
        if step == at:
            raise _Killed

    with pytest.raises(_Killed):
        finetune(enc, heads, FT_DATA, config, on_step=stop, checkpoint=ck, checkpoint_seconds=0, **kwargs)
    return enc, heads, ck


@pytest.mark.parametrize("kill_at", [3, 4, 5, 9])  # in epoch 1, its last step, epoch 2 (from its start), 3
def test_a_training_killed_part_way_resumes_to_the_same_weights(bert_tokenizer, tmp_path, kill_at):
    """With a checkpoint file, a run killed part-way goes on from its last save and ends with the weights, curve and
    best epoch of an unbroken run (the benchmark's hour-long multitask model lost its progress with each session)."""
    config = dataclasses.replace(FT_CONFIG, patience=2)
    enc, heads = _ft_setup(bert_tokenizer)

    def validate(encoder):  # higher is better; the heads are frozen, the same in every set-up
        return -_dataset_loss(encoder, heads)

    whole = finetune(enc, heads, FT_DATA, config, validate=validate)
    want = {k: v.clone() for k, v in enc.state_dict().items()}

    ck = tmp_path / "train.pt"

    def kill(step, total, loss):
        if step == kill_at:
            raise _Killed

    enc, heads = _ft_setup(bert_tokenizer)
    with pytest.raises(_Killed):
        finetune(enc, heads, FT_DATA, config, validate=validate, on_step=kill, checkpoint=ck, checkpoint_seconds=0)
    assert ck.is_file()
    enc, heads = _ft_setup(bert_tokenizer)  # a new process: fresh weights, the checkpoint's state
    steps = []
    again = finetune(enc, heads, FT_DATA, config, validate=validate, checkpoint=ck, checkpoint_seconds=0,
                     on_step=lambda s, total, loss: steps.append(s))
    assert steps[0] == kill_at and again.steps == whole.steps  # the killed step is trained again, none before it
    assert [(r.epoch, r.train_loss, r.validation) for r in again.curve] == \
        [(r.epoch, r.train_loss, r.validation) for r in whole.curve]
    assert again.best_epoch == whole.best_epoch
    for k, v in enc.state_dict().items():
        assert torch.equal(v, want[k]), k
    enc, heads = _ft_setup(bert_tokenizer)
    other = dataclasses.replace(config, seed=config.seed + 1)
    with pytest.raises(ValueError, match="a training checkpoint of another run"):
        finetune(enc, heads, FT_DATA, other, validate=validate, checkpoint=ck)



def test_a_training_checkpoint_is_checked_before_any_training(bert_tokenizer, tmp_path):
    """hp64b c01, c03, c05, c11, c12, c13, c25: a text file as the checkpoint was a bare KeyError of torch's pickle
    reader; another run's checkpoint (other examples, same step count and seed) was resumed; a FIFO blocked
    torch.load; a missing folder and an empty name failed at the first save, an epoch's work lost; a NaN interval
    never saved; a task without a head, a label past the classes, batch_size 0 and an lr of NaN were bare errors."""
    import os

    from tiesmerge.errors import ConfigError

    enc, heads = _ft_setup(bert_tokenizer)
    (tmp_path / "text.pt").write_text("hello")
    os.mkfifo(tmp_path / "fifo.pt")
    cases = [(dict(checkpoint=tmp_path / "text.pt"), "not a training checkpoint"),
             (dict(checkpoint=tmp_path / "fifo.pt"), "not a regular file"),
             (dict(checkpoint=tmp_path / "nodir" / "ck.pt"), "folder .* does not exist"),
             (dict(checkpoint=""), "is not the path of a file"),
             (dict(checkpoint=f"{tmp_path / 'ck.pt'}/"), "is not the path of a file"),  # (hp65b c21)
             (dict(checkpoint=tmp_path / "ck.pt", checkpoint_seconds=float("nan")), "not a number of seconds")]
    for kwargs, said in cases:
        with pytest.raises(ConfigError, match=said):
            finetune(enc, heads, FT_DATA, FT_CONFIG, **kwargs)
    for config, data, said in [
        (dataclasses.replace(FT_CONFIG, batch_size=0), FT_DATA, "batch_size must be a whole number >= 1"),
        (dataclasses.replace(FT_CONFIG, lr=float("nan")), FT_DATA, "lr must be a finite number > 0"),
        (dataclasses.replace(FT_CONFIG, warmup_fraction=5), FT_DATA, r"warmup_fraction must be a fraction in \[0, 1\]"),
        (FT_CONFIG, {"other": [("x", 0)]}, "task 'other' has no head"),
        (FT_CONFIG, {"animals": [("x", 5)]}, r"label 5 is not a class index of its head \(0 to 1\)"),
        (FT_CONFIG, {"animals": []}, "no examples to train on"),
    ]:
        with pytest.raises(ConfigError, match=said):
            finetune(enc, heads, data, config)

    _, _, ck = _interrupted_run(bert_tokenizer, tmp_path)
    other = {task: [(text + " again", label) for text, label in rows] for task, rows in FT_DATA.items()}
    enc, heads = _ft_setup(bert_tokenizer)
    with pytest.raises(ConfigError, match="a training checkpoint of another run"):  # same steps and seed, other data
        finetune(enc, heads, other, FT_CONFIG, checkpoint=ck)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_a_training_checkpoint_that_cannot_be_written_leaves_nothing(tmp_path, monkeypatch):
    """hp64b c04: a full disk while saving was torch's bare RuntimeError, its partial file left beside it."""
    from tiesmerge.errors import OutputError
    from tiesmerge.evaluation import train_checkpoint

    def full(state, path):
        with open(path, "wb") as f:
            f.write(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 20224 vs 20112")

    monkeypatch.setattr(train_checkpoint.torch, "save", full)
    with pytest.raises(OutputError, match="cannot save the training checkpoint"):
        train_checkpoint.save_training_state(str(tmp_path / "ck.pt"), {"x": 1})
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_of_another_encoder_or_without_validation_is_refused(bert_tokenizer, tmp_path):
    """hp64b c14, c43, c26: a checkpoint of another encoder was torch's bare load_state_dict error; one of a run with
    validation resumed by a run without it ended with the old run's best epoch, not its last; a dead run's
    <checkpoint>.<pid>.partial stayed for good."""
    import subprocess
    import sys

    from tiesmerge.errors import ConfigError

    _, _, ck = _interrupted_run(bert_tokenizer, tmp_path, validate=lambda e: 0.5)
    enc, heads = _ft_setup(bert_tokenizer)
    with pytest.raises(ConfigError, match="a training checkpoint of another run"):
        finetune(enc, heads, FT_DATA, FT_CONFIG, checkpoint=ck)  # no validate
    other = tiny_bert_encoder(bert_tokenizer, seed=5, hidden=16)
    with pytest.raises(ConfigError, match="a training checkpoint of another run"):
        finetune(other, {t: build_head(other, d) for t, d in FT_DESCRIPTIONS.items()}, FT_DATA, FT_CONFIG,
                 checkpoint=ck, validate=lambda e: 0.5)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"ck.pt.{dead.stdout.strip()}.partial"
    stale.write_bytes(b"PK\x03\x04half a save")  # what torch.save begins: a zip archive
    mine = tmp_path / f"ck.pt.{int(dead.stdout) + 1}.partial"  # (no process: the pid after a dead one's, likely)
    mine.write_text("my notes")  # a user's file so named stays (hp66b c42)
    enc, heads = _ft_setup(bert_tokenizer)
    finetune(enc, heads, FT_DATA, FT_CONFIG, checkpoint=ck, validate=lambda e: 0.5)
    assert not stale.exists() and mine.read_text() == "my notes"


@pytest.mark.parametrize("edit, said", [
    (lambda s: s.update(curve=[[1, 0.5, 0.5]]), "curve is not one"),
    (lambda s: s.update(step="x"), "step 'x' is out of the run's range"),
    (lambda s: s.update(epoch="1"), "epoch '1' is not one of the run's"),
    (lambda s: s.update(done=10**30), "is not a batch of epoch"),
    (lambda s: s.update(losses="abc"), "losses is not a list of numbers"),
    (lambda s: s.update(seconds="1"), "seconds '1' is not a number of seconds"),
    (lambda s: s.update(optimizer={}), "the optimizer's state"),
    (lambda s: s.update(rng=torch.zeros(3, dtype=torch.uint8)), "rng is not torch's random state"),
    (lambda s: s["encoder"].update({k: torch.full_like(v, float("nan")) for k, v in s["encoder"].items()
                                    if v.is_floating_point()}), "holds values that are not finite"),
    (lambda s: s["encoder"].update({next(iter(s["encoder"])): torch.zeros(1)}), "does not hold the encoder's"),
    # hp66b c01-c10
    (lambda s: s.update(seconds=10**400), "seconds .* is not a number of seconds"),
    (lambda s: s.update(loss_value=float("nan")), "loss_value is not a number"),
    (lambda s: s["optimizer"]["param_groups"][0].update(lr="x"), "the optimizer's state.* holds 'x'"),
    (lambda s: s["schedule"].update(step=1), "the schedule's state has other fields"),
    (lambda s: s["schedule"].update(last_epoch="x"), "the schedule's state's last_epoch holds 'x'"),
    (lambda s: s.update(rng=torch.randint(0, 256, s["rng"].shape, dtype=torch.uint8)), "the random state"),
    (lambda s: [v.fill_(float("nan")) for v in s["optimizer"]["state"][0].values() if v.dim()],
     "the optimizer's state holds values that are not finite"),
    (lambda s: s.update(step=s["step"] - 1), "is not the batches of the epochs before it"),  # hp66b c23
    (lambda s: s.update(cuda_rng=torch.zeros(2, 2)), "cuda_rng is not a CUDA generator's random state"),  # hp67b c34
])
def test_an_edited_training_checkpoint_is_refused_as_damaged(bert_tokenizer, tmp_path, edit, said):
    """hp65b c02-c04: a checkpoint edited with its fingerprint kept was a bare TypeError, KeyError or RuntimeError,
    an epoch of '1' or a done of 10**30 resumed the wrong steps silently, and NaN weights were trained on."""
    from tiesmerge.errors import ConfigError

    enc, heads, ck = _interrupted_run(bert_tokenizer, tmp_path)
    state = torch.load(ck, weights_only=True)
    edit(state)
    torch.save(state, ck)
    enc, heads = _ft_setup(bert_tokenizer)
    with pytest.raises(ConfigError, match=said):
        finetune(enc, heads, FT_DATA, FT_CONFIG, checkpoint=ck)


def test_other_starting_weights_a_long_name_and_a_nan_score_are_refused(bert_tokenizer, tmp_path):
    """hp65b c05: another encoder of the same shapes (or other heads) resumed another run's checkpoint; c01: a name
    too long for its staged save was refused after training; c06, c07: a NaN or a text from validate kept epoch 1
    for good, or was a bare ValueError."""
    from tiesmerge.errors import ConfigError

    enc, heads, ck = _interrupted_run(bert_tokenizer, tmp_path)
    other = tiny_bert_encoder(bert_tokenizer, seed=6)  # same shapes, other weights
    with pytest.raises(ConfigError, match="a training checkpoint of another run"):
        finetune(other, heads, FT_DATA, FT_CONFIG, checkpoint=ck)
    with pytest.raises(ConfigError, match="the checkpoint's name is too long"):
        finetune(enc, heads, FT_DATA, FT_CONFIG, checkpoint=tmp_path / ("x" * 245))
    for score, said in ((float("nan"), r"validate \(after epoch 1\): returned nan, not a finite number"),
                        ("high", r"validate \(after epoch 1\): returned 'high' \(str\), not a number"),
                        (torch.tensor([0.5, 0.6]), "not a number"), (True, "not a number"), (1e301, "past the")):
        enc, heads = _ft_setup(bert_tokenizer)
        with pytest.raises(ConfigError, match=said):
            finetune(enc, heads, FT_DATA, FT_CONFIG, validate=lambda e, s=score: s)


def test_validate_may_return_numpy_torch_and_exact_numbers(bert_tokenizer):
    """hp68b c16: validate returning np.float32(0.5) or torch.tensor(0.5) was refused as "not a finite number",
    where tune's evaluators may return them."""
    from decimal import Decimal

    import numpy as np

    for score in (np.float32(0.5), torch.tensor(0.5), Decimal("0.5"), np.int64(1)):
        enc, heads = _ft_setup(bert_tokenizer)
        log = finetune(enc, heads, FT_DATA, dataclasses.replace(FT_CONFIG, epochs=1), validate=lambda e, s=score: s)
        assert log.best_validation == float(score) and type(log.best_validation) is float


def test_training_on_texts_the_tokenizer_reads_as_unknown_is_said(bert_tokenizer):
    """hp65b c27: finetune on texts every word of which the tokenizer reads as [UNK] gave no word, where tune, stats
    and adapt warn of the same data."""
    from tiesmerge.errors import MergeWarning

    enc, heads = _ft_setup(bert_tokenizer)
    # task by task: a task of unknown words after a larger one of known words is said too (hp66b c35)
    unknown = {"weather": FT_DATA["weather"] * 40, "animals": [("zzqx vvwy", 0), ("qqzz xxvy", 1)]}
    with pytest.warns(MergeWarning, match="the training examples of task 'animals': .* unknown to the base's "
                                          "tokenizer"):
        finetune(enc, heads, unknown, dataclasses.replace(FT_CONFIG, epochs=1))


def test_finetunes_settings_and_examples_are_checked_before_any_step(bert_tokenizer):
    """hp66b c11-c18: a seed of 2**70 or "x" was torch's bare error, 1.5 trained; 10**8 epochs drew batches for
    minutes, then a MemoryError; a text of None, examples as an iterator, a bytes text and a numpy label were bare
    errors or blamed on the model's config."""
    import numpy as np

    from tiesmerge.errors import ConfigError

    enc, heads = _ft_setup(bert_tokenizer)
    for config, said in [(dataclasses.replace(FT_CONFIG, seed=2**70), "seed must be a whole number"),
                         (dataclasses.replace(FT_CONFIG, seed="x"), "seed must be a whole number"),
                         (dataclasses.replace(FT_CONFIG, seed=1.5), "seed must be a whole number"),
                         (dataclasses.replace(FT_CONFIG, epochs=10**8), "epochs must be a whole number from 1 to"),
                         (dataclasses.replace(FT_CONFIG, epochs=True), "epochs must be a whole number")]:
        with pytest.raises(ConfigError, match=said):
            finetune(enc, heads, FT_DATA, config)
    for data, said in [({"animals": [(None, 0)]}, "the text is 'None'"),
                       ({"animals": iter([("a cat", 0)])}, "not a list of \\(text, label\\) pairs"),
                       ({"animals": [(b"good", 0)]}, "not a non-empty text"),
                       ({"animals": [("bad \ud800 text", 0)]}, "not a non-empty text"),
                       ({"animals": [("a cat", np.int64(0))]}, "is a int64, not a Python int")]:
        with pytest.raises(ConfigError, match=said):
            finetune(enc, heads, data, FT_CONFIG)


def test_heads_frozen_encoders_and_overflowing_training_are_typed(bert_tokenizer, tmp_path):
    """hp66b c27-c30, c38, c43: NaN heads or a huge lr ended with NaN weights without a word; a head of another width
    was torch's "mat1 and mat2 shapes cannot be multiplied"; a frozen encoder autograd's bare error; a checkpoint
    interval of 10**400 an OverflowError."""
    from tiesmerge.errors import ConfigError, TrainingError

    enc, heads = _ft_setup(bert_tokenizer)
    with pytest.raises(TrainingError, match="the training loss is .* at step"):
        finetune(enc, heads, FT_DATA, dataclasses.replace(FT_CONFIG, lr=1e30))
    enc, heads = _ft_setup(bert_tokenizer)
    bad = dict(heads)
    bad["animals"] = dataclasses.replace(heads["animals"], class_embeddings=torch.full_like(
        heads["animals"].class_embeddings, float("nan")))
    with pytest.raises(ConfigError, match="its head holds values that are not finite"):
        finetune(enc, bad, FT_DATA, FT_CONFIG)
    bad["animals"] = dataclasses.replace(heads["animals"], class_embeddings=torch.ones(2, 8))
    with pytest.raises(ConfigError, match=r"its head is \(2, 8\), but the encoder's embeddings have 32"):
        finetune(enc, bad, FT_DATA, FT_CONFIG)
    with pytest.raises(ConfigError, match="not a number of seconds"):
        finetune(enc, heads, FT_DATA, FT_CONFIG, checkpoint=tmp_path / "ck.pt", checkpoint_seconds=10**400)
    for p in enc.parameters():
        p.requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameter"):
        finetune(enc, heads, FT_DATA, FT_CONFIG)


@pytest.mark.parametrize("edit, said", [
    (lambda s: s.update(seen=10**15), "more examples than"),
    (lambda s: s.update(best_score=-5.0), "not the curve's best validation score"),
    (lambda s: s.update(best_score=1e300), "not the curve's best validation score"),
])
def test_a_validated_checkpoints_best_epoch_must_be_its_curves(bert_tokenizer, tmp_path, edit, said):
    """hp67b c03-c06: seen of 10**15, or a best score that is not the curve's best, resumed silently (another epoch's
    weights kept, a score no epoch had reported)."""
    from tiesmerge.errors import ConfigError

    scores = iter([0.5, 0.9, 0.1, 0.1])
    config = dataclasses.replace(FT_CONFIG, epochs=3)
    _, _, ck = _interrupted_run(bert_tokenizer, tmp_path, at=9, config=config, validate=lambda e: next(scores))
    state = torch.load(ck, weights_only=True)
    edit(state)
    torch.save(state, ck)
    enc, heads = _ft_setup(bert_tokenizer)
    with pytest.raises(ConfigError, match=said):
        finetune(enc, heads, FT_DATA, config, checkpoint=ck, validate=lambda e: 0.5)


def test_the_same_examples_in_another_task_order_are_another_run(bert_tokenizer, tmp_path):
    """hp67b c33: the batches follow the tasks' order, the fingerprint sorted them: another order resumed."""
    from tiesmerge.errors import ConfigError

    _, _, ck = _interrupted_run(bert_tokenizer, tmp_path)
    enc, heads = _ft_setup(bert_tokenizer)
    with pytest.raises(ConfigError, match="a training checkpoint of another run"):
        finetune(enc, heads, dict(reversed(list(FT_DATA.items()))), FT_CONFIG, checkpoint=ck)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_training_resumes_with_its_dropout_draws(bert_tokenizer, tmp_path):
    """hp67b c34: the checkpoint held the CPU generator's state alone; on CUDA, dropout draws from the device's own
    generator, re-seeded on resume, so a resumed run ended with other weights than an unbroken one."""
    from tiesmerge.errors import MergeWarning

    enc, heads = _ft_setup(bert_tokenizer)
    finetune(enc.to("cuda"), heads, FT_DATA, FT_CONFIG)
    want = {k: v.cpu() for k, v in enc.state_dict().items()}

    def kill(step, total, loss):
        if step == 5:
            raise _Killed

    ck = tmp_path / "train.pt"
    enc, heads = _ft_setup(bert_tokenizer)
    with pytest.raises(_Killed):
        finetune(enc.to("cuda"), heads, FT_DATA, FT_CONFIG, on_step=kill, checkpoint=ck, checkpoint_seconds=0)
    assert torch.load(ck, weights_only=True)["cuda_rng"] is not None
    enc, heads = _ft_setup(bert_tokenizer)
    finetune(enc.to("cuda"), heads, FT_DATA, FT_CONFIG, checkpoint=ck, checkpoint_seconds=0)
    for k, v in enc.state_dict().items():
        torch.testing.assert_close(v.cpu(), want[k], rtol=1e-4, atol=1e-5)  # atomics may reorder sums
    # a checkpoint saved on the CPU goes on on CUDA, said to differ from an unbroken run
    (tmp_path / "cpu").mkdir()
    enc, heads, cpu_ck = _interrupted_run(bert_tokenizer, tmp_path / "cpu")
    enc, heads = _ft_setup(bert_tokenizer)
    with pytest.warns(MergeWarning, match="saved by a run on the CPU"):
        finetune(enc.to("cuda"), heads, FT_DATA, FT_CONFIG, checkpoint=cpu_ck)
