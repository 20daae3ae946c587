"""The explorer offers every supported model family: a CNN backbone builds the methods that run on it and answers
the others with the refusal (which names the methods that work); an hf: backbone loads from a local folder."""

from __future__ import annotations

import pytest

from mmel.app.inputs import InputError
from mmel.app.models import BackboneSpec, ModelCache, missing_weights
from tests.test_hf_clip import _tiny_config, random_hf_clip, save_tokenizer


def test_app_cnn_backbone_offers_its_methods_and_refuses_the_others():
    cache = ModelCache({"rn50": BackboneSpec("rn50", "RN50", None)})
    assert type(cache.explainer("rn50", "gradcam")).__name__ == "GradCAM"
    with pytest.raises(InputError, match=r"Explainer: explainer 'grad_eclip' does not support model 'RN50'.*rise"):
        cache.explainer("rn50", "grad_eclip")


def test_app_hf_backbone_from_a_folder(tmp_path):
    random_hf_clip(_tiny_config()).save_pretrained(tmp_path)
    save_tokenizer(tmp_path)
    spec = BackboneSpec("hf", "hf:openai/clip-vit-base-patch16", None)
    assert missing_weights(spec, str(tmp_path)) is None
    assert "no such Hugging Face model folder" in missing_weights(spec, str(tmp_path / "absent"))
    cache = ModelCache({"hf": spec})
    clip = cache.clip("hf", str(tmp_path))
    assert clip.name == f"hf:{tmp_path}" and clip.patch_size == 8
    assert type(cache.explainer("hf", "grad_eclip", str(tmp_path))).__name__ == "GradECLIP"
