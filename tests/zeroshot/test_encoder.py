"""Loading every way users point at weights, and parity with open_clip's own zero-shot recipe."""

from __future__ import annotations

import asyncio
import base64
import copy
import io
import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES
from PIL import Image

from backend.config import load_settings
from backend.errors import ConfigError, ModelUnavailable
from backend.labelstudio.label_config import parse_label_config
from backend.runtime import Backend
from backend.zeroshot.encoder import (
    ModelSpec,
    OpenClipEncoder,
    autocast_dtype,
    load_encoder,
    resolve_device,
    weights_dtype,
)
from backend.zeroshot.scoring import probabilities

CLASSES = ["cat", "dog", "school bus", "red apple", "mountain lake"]
TOLERANCE = 1e-5


def random_images(count: int, size: int = 48) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8))
            for _ in range(count)]


def png_data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def config_for(classes: list[str], templates: str) -> str:
    choices = "".join(f'<Choice value="{name}"/>' for name in classes)
    return (f'<View><Image name="image" value="$image"/><Choices name="c" toName="image" '
            f'model_templates="{templates}">{choices}</Choices></View>')


def reference_probabilities(encoder, images, templates) -> np.ndarray:
    """open_clip's recipe, with open_clip's own functions and preprocessing."""
    model = encoder.model
    tokenizer = encoder.tokenizer
    with torch.no_grad():
        weights = open_clip.build_zero_shot_classifier(
            model, tokenizer, classnames=CLASSES, templates=templates, device="cpu")
        pixels = torch.stack([encoder.preprocess(image) for image in images])
        features = model.encode_image(pixels, normalize=True)
        logits = model.logit_scale.exp() * features @ weights
        if model.logit_bias is not None:
            return torch.sigmoid(logits + model.logit_bias).double().numpy()
        return logits.softmax(dim=-1).double().numpy()


def backend_probabilities(settings, images, template_set: str) -> tuple[np.ndarray, np.ndarray]:
    """Through the whole backend: head from the text cache, and /predict's top_k scores."""
    model = Backend(settings.model_copy(update={"TOP_K": len(CLASSES)}))
    config = config_for(CLASSES, template_set)

    async def run():
        model.start()
        try:
            ctx = await model.context(config)
            pixels = torch.stack([model.encoder.preprocess(image) for image in images])
            direct = probabilities(ctx.heads[0], model.encoder.encode_images(pixels))
            tasks = [{"id": i, "data": {"image": png_data_uri(img)}} for i, img in enumerate(images)]
            results = await model.predict(tasks, label_config=config)
            return direct, results
        finally:
            await model.aclose()

    direct, results = asyncio.run(run())
    served = np.array([[next(alt["score"] for alt in result["result"][0]["top_k"]
                             if alt["label"] == name) for name in CLASSES] for result in results])
    return direct, served, model


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_parity_with_open_clip_on_random_tiny_model(tiny_configs, family):
    settings = load_settings(MODEL_CONFIG=tiny_configs[family], MODEL_PRETRAINED="none")
    images = random_images(6)
    direct, served, model = backend_probabilities(settings, images, "openai")
    reference = reference_probabilities(model.encoder, images, OPENAI_IMAGENET_TEMPLATES)
    assert model.encoder.family == family
    np.testing.assert_allclose(direct, reference, atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(served, reference, atol=TOLERANCE, rtol=0)


@pytest.mark.slow
def test_parity_with_open_clip_on_random_vit_b_32():
    settings = load_settings(MODEL_NAME="ViT-B-32", MODEL_PRETRAINED="none")
    images = random_images(3, size=64)
    direct, served, model = backend_probabilities(settings, images, "simple")
    reference = reference_probabilities(model.encoder, images, SIMPLE_IMAGENET_TEMPLATES)
    np.testing.assert_allclose(direct, reference, atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(served, reference, atol=TOLERANCE, rtol=0)
    assert model.encoder.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)  # open_clip's init


def test_mean_pooling_of_one_name_is_exactly_open_clips_classifier(tiny_configs):
    """With one name per label, the head's rows are open_clip's classifier columns."""
    settings = load_settings(MODEL_CONFIG=tiny_configs["clip"], MODEL_PRETRAINED="none")
    model = Backend(settings)

    async def head():
        model.start()
        try:
            return (await model.context(config_for(CLASSES, "simple"))).heads[0]
        finally:
            await model.aclose()

    weights = asyncio.run(head()).weights
    reference = open_clip.build_zero_shot_classifier(
        model.encoder.model, model.encoder.tokenizer, CLASSES, SIMPLE_IMAGENET_TEMPLATES)
    torch.testing.assert_close(weights, reference.T, atol=1e-6, rtol=0)


def save_checkpoint(tiny_configs, path: Path) -> torch.Tensor:
    """Train-free 'fine-tune': random weights saved to a file; returns a probe embedding."""
    name = tiny_configs["clip"].stem
    open_clip.add_model_config(str(tiny_configs["clip"]))
    model = open_clip.create_model(name, pretrained=None)
    with torch.no_grad():
        model.logit_scale.fill_(4.2)
    torch.save(model.state_dict(), path)
    return model.eval().encode_text(open_clip.get_tokenizer(name)(["probe"]), normalize=True)


def test_local_checkpoint_path_loads_those_weights(tiny_configs, tmp_path):
    probe = save_checkpoint(tiny_configs, tmp_path / "finetuned.pt")
    settings = load_settings(MODEL_CONFIG=tiny_configs["clip"],
                             MODEL_PRETRAINED=str(tmp_path / "finetuned.pt"))
    encoder = load_encoder(settings)
    torch.testing.assert_close(encoder.encode_texts(["probe"]), probe, atol=1e-6, rtol=0)
    assert encoder.logit_scale == pytest.approx(np.exp(4.2), rel=1e-6)
    label = ModelSpec.from_settings(settings).label()
    assert label.startswith("tiny-test-clip/finetuned-")


def test_local_dir_schema_loads_config_weights_and_tokenizer(tiny_configs, tmp_path):
    folder = tmp_path / "air-gapped"
    folder.mkdir()
    probe = save_checkpoint(tiny_configs, folder / "open_clip_pytorch_model.bin")
    model_cfg = json.loads(tiny_configs["clip"].read_text())
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    settings = load_settings(MODEL_NAME=f"local-dir:{folder}")
    encoder = load_encoder(settings)
    torch.testing.assert_close(encoder.encode_texts(["probe"]), probe, atol=1e-6, rtol=0)
    assert ModelSpec.from_settings(settings).label() == "local-dir:air-gapped"


def test_checkpoint_that_does_not_fit_the_architecture_is_reported(tiny_configs, tmp_path):
    bad = tmp_path / "wrong.pt"
    torch.save({"not": torch.zeros(1)}, bad)
    settings = load_settings(MODEL_CONFIG=tiny_configs["clip"], MODEL_PRETRAINED=str(bad))
    with pytest.raises(ModelUnavailable, match="Check that the checkpoint matches"):
        load_encoder(settings)


def test_unknown_architecture_and_tag_are_config_errors():
    with pytest.raises(ConfigError, match="MODEL_CONFIG"):
        load_encoder(load_settings(MODEL_NAME="ViT-Imaginary"))
    with pytest.raises(ConfigError, match="known: .*laion2b_s34b_b79k"):
        load_encoder(load_settings(MODEL_NAME="ViT-B-32", MODEL_PRETRAINED="nonsense"))


def test_default_model_without_network_says_how_to_use_a_local_checkpoint():
    with pytest.raises(ModelUnavailable) as caught:
        load_encoder(load_settings())
    message = str(caught.value)
    assert "ViT-B-16-SigLIP/webli" in message
    assert "MODEL_PRETRAINED=/path/to/" in message and "local-dir:" in message


def test_device_and_precision_choice():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="set DEVICE=auto or cpu"):
            resolve_device("cuda:0")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype(cpu, "auto") is None
    assert autocast_dtype(cuda, "fp16") is torch.float16
    assert autocast_dtype(cuda, "fp32") is None
    assert autocast_dtype(cpu, "bf16") is None  # on CPU, bf16 weights: autocast is slower
    assert weights_dtype(cpu, "bf16") is torch.bfloat16
    assert weights_dtype(cpu, "auto") is None and weights_dtype(cuda, "bf16") is None


def test_bf16_weights_on_cpu_keep_scoring_constants_and_embeddings(tiny_configs):
    settings = load_settings(MODEL_CONFIG=tiny_configs["siglip"], MODEL_PRETRAINED="none")
    fp32 = load_encoder(settings)
    bf16 = OpenClipEncoder(copy.deepcopy(fp32.model), fp32.preprocess, fp32.tokenizer,
                           torch.device("cpu"), None, torch.bfloat16)
    assert (bf16.logit_scale, bf16.logit_bias) == (fp32.logit_scale, fp32.logit_bias)
    pixels = torch.stack([fp32.preprocess(image) for image in random_images(4)])
    for encode in ("encode_images", "encode_texts"):
        given = pixels if encode == "encode_images" else ["a photo of a cat.", "a dog"]
        ours, theirs = getattr(bf16, encode)(given), getattr(fp32, encode)(given)
        assert ours.dtype == torch.float32
        assert torch.nn.functional.cosine_similarity(ours, theirs).min() > 0.99
    assert bf16.describe()["precision"] == "bfloat16"


def test_model_version_names_backbone_weights_and_prompts(tiny_settings):
    model = Backend(tiny_settings)
    parsed = parse_label_config(config_for(CLASSES, "simple"))
    version = model.contexts.model_version(parsed)
    assert version.startswith("tiny-test-clip/none:p") and len(version.split(":p")[1]) == 8
    other = parse_label_config(config_for(CLASSES[:-1], "simple"))
    assert model.contexts.model_version(other) != version


def test_threads_sets_pytorchs_cpu_threads(tiny_configs):
    before = torch.get_num_threads()
    try:
        load_encoder(load_settings(MODEL_CONFIG=tiny_configs["clip"], MODEL_PRETRAINED="none",
                                   THREADS=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_fast_preprocessing_gives_open_clips_exact_tensors():
    """ToTensor + Normalize run in NumPy (no PyTorch thread pool in the decode threads): the
    tensors must be bit-identical to open_clip's own pipeline, for every image shape and mode."""
    import open_clip
    from PIL import Image

    from backend.zeroshot.encoder import _split_preprocess

    _, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    head, tail = _split_preprocess(preprocess)
    assert tail is not None
    rng = np.random.default_rng(0)
    for size, mode in (((640, 480), "RGB"), ((97, 301), "RGB"), ((224, 224), "L"),
                       ((50, 40), "RGBA")):
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8),
                                "RGBA").convert(mode)
        staged = image
        for step in head:
            staged = step(staged)
        assert torch.equal(tail(staged), preprocess(image)), (size, mode)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_uint8_pixels_encode_bit_identically_to_the_float_path_on_cpu(tiny_configs, family):
    """The data plane's route (PIL steps in a decode process, uint8 normalised on the device)
    gives the very embeddings of `preprocess` + `encode_images`, whichever layout."""
    from backend.images.steps import apply_steps

    encoder = load_encoder(load_settings(MODEL_CONFIG=tiny_configs[family],
                                         MODEL_PRETRAINED="none"))
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
              for h, w in ((48, 56), (100, 30), (32, 32), (31, 70), (500, 333))]
    assert encoder.pixel_steps is not None
    uint8 = torch.stack([torch.from_numpy(np.array(apply_steps(image, encoder.pixel_steps)))
                         for image in images])
    floats = torch.stack([encoder.preprocess(image) for image in images])
    assert uint8.dtype == torch.uint8 and uint8.shape[1:] == (encoder.input_size,) * 2 + (3,)
    expected = encoder.encode_images(floats)
    assert torch.equal(encoder.encode_pixels(uint8), expected)
    assert torch.equal(encoder.encode_pixels(uint8.permute(0, 3, 1, 2)), expected)


def test_a_preprocess_with_steps_the_plane_cannot_reproduce_has_no_pixel_steps(tiny_configs):
    from torchvision import transforms as tv

    encoder = load_encoder(load_settings(MODEL_CONFIG=tiny_configs["clip"],
                                         MODEL_PRETRAINED="none"))
    odd = tv.Compose([tv.Resize(32), tv.RandomHorizontalFlip(), tv.CenterCrop(32),
                      tv.ToTensor(), tv.Normalize((0.5,) * 3, (0.5,) * 3)])
    other = OpenClipEncoder(encoder.model, odd, encoder.tokenizer, encoder.device, None)
    assert other.pixel_steps is None  # the in-process path serves it, as before
