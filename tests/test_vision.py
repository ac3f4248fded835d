"""Vision-language models end to end on a tiny seeded random LLaVA built here.

No pretrained LLaVA can be downloaded, so the model is built from config (a 2-layer CLIP
vision tower on 32x32 images with 8x8 patches = 16 image tokens, a projector, a 2-layer
Llama), with a BPE tokenizer trained here and the real ``LlavaProcessor``; it is saved and
loaded back through ``prefixkv.load_model``.  Images are made with numpy and Pillow.

The engine is built once per module (calibrate -> export -> engine -> validate): about a
minute of ONNX export on two cores.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from prefixkv.search import SearchSettings
from prefixkv.vision.data import ImageError

IMAGE_TOKEN_ID = 299
TOKENS_PER_IMAGE = 16


# -- the tiny LLaVA ---------------------------------------------------------------------------------
def make_tiny_llava(folder):
    """Save a seeded random LlavaForConditionalGeneration + LlavaProcessor into ``folder``."""
    from pydoc_data.topics import topics

    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=IMAGE_TOKEN_ID, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([topics[k] for k in sorted(topics)[:40]], trainer)
    tok.add_special_tokens(["<image>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert tok.token_to_id("<image>") == IMAGE_TOKEN_ID
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   extra_special_tokens={"image_token": "<image>"})
    template = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
                "{% else %}ASSISTANT: {{ m['content'][0]['text'] }}</s>{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                               tokenizer=fast, patch_size=8, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=template)
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8)
    text = LlamaConfig(vocab_size=IMAGE_TOKEN_ID + 1, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    LlavaForConditionalGeneration(config).eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    config_path = folder / "tokenizer_config.json"  # as LLaVA-1.5's: the BOS is added to every prompt
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "add_bos_token": True}))
    return folder


def picture(seed: int, size=(40, 52)):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8))


QUESTIONS = ["What is in the picture? Describe the colours and the shapes you see.",
             "Which colour covers most of the image?",
             "Is there a square in the picture? Answer in a sentence."]


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """(folder, model, processor, data folder with images and data files)."""
    from prefixkv import load_model

    root = tmp_path_factory.mktemp("vision")
    folder = make_tiny_llava(root / "tiny-llava")
    data = root / "data"
    (data / "images").mkdir(parents=True)
    records = []
    for i in range(4):
        picture(i, (36 + 5 * i, 52)).save(data / "images" / f"{i}.png")
        records.append({"id": f"s{i}", "image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": f"<image>\n{QUESTIONS[i % 3]}"}, {"from": "gpt", "value": "A picture of noise in many colours."},
            {"from": "human", "value": "Anything else?"}, {"from": "gpt", "value": "No."}]})
    (data / "llava.json").write_text(json.dumps(records))
    model, processor = load_model(str(folder))
    return folder, model, processor, data


@pytest.fixture(scope="module")
def engine(llava, tmp_path_factory):
    """calibrate -> export -> engine -> validate, once: (engine folder, BuildResult)."""
    from prefixkv.engines.validate import ValidationConfig
    from prefixkv.pipeline import (
        BuildConfig,
        CalibrationConfig,
        DataConfig,
        build_engine,
    )
    from prefixkv.vision.data import load_samples

    folder, model, processor, data = llava
    samples = load_samples(data / "llava.json", first_turn_only=True)
    out = tmp_path_factory.mktemp("engines") / "llava-k50"
    calibration = CalibrationConfig(search=SearchSettings(sink=2), data=DataConfig(data / "llava.json", first_turn_only=True))
    validation = ValidationConfig(samples=samples[:2] + [{"prompt": "Describe a beach.", "image": None}], max_new_tokens=12)
    config = BuildConfig(str(folder), out, 0.5, calibration=calibration, validation=validation)
    result = build_engine(config, model=model, tokenizer=processor, log=lambda m: None)
    return out, result


# -- data -----------------------------------------------------------------------------------------
def test_llava_conversations_and_jsonl(llava, tmp_path):
    from prefixkv.vision.data import load_samples

    _, _, _, data = llava
    samples = load_samples(data / "llava.json")
    assert len(samples) == 8  # two exchanges per conversation
    assert samples[0]["prompt"].startswith("<image>\n") and samples[0]["reference"].startswith("A picture")
    assert samples[0]["image"] == str(data / "images" / "0.png")
    assert samples[1]["prompt"].startswith("<image>\n") and samples[1]["prompt"].endswith("Anything else?")
    assert len(load_samples(data / "llava.json", first_turn_only=True)) == 4

    jsonl = data / "rows.jsonl"
    jsonl.write_text(json.dumps({"prompt": "<image>\nWhat?", "reference": "x", "image": "images/1.png"}) + "\n"
                     + json.dumps({"prompt": "text only"}) + "\n")
    rows = load_samples(jsonl)
    assert rows[0]["image"] == str(data / "images" / "1.png") and rows[1].get("image") is None

    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps([{"image": "nope.png", "conversations": [{"from": "human", "value": "<image>\nq"},
                                                                            {"from": "gpt", "value": "a"}]}]))
    with pytest.raises(ImageError, match="nope.png, which does not exist"):
        load_samples(missing)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]}]))
    with pytest.raises(ValueError, match="alternate"):
        load_samples(bad)


def test_load_image_errors(tmp_path):
    from prefixkv.vision.data import decode_image, load_image

    with pytest.raises(ImageError, match="no image at"):
        load_image(tmp_path / "absent.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(broken)
    with pytest.raises(ImageError, match="not a readable image"):
        decode_image(b"\x89PNG garbage")
    picture(0).convert("L").save(tmp_path / "grey.png")
    assert load_image(tmp_path / "grey.png").mode == "RGB"


# -- preprocessing and prompts --------------------------------------------------------------------
def test_preprocessing_and_tokens_match_the_models_processor(llava):
    from prefixkv.engines.torch import TorchVisionRunner

    folder, model, processor, _ = llava
    runner = TorchVisionRunner(model, folder)  # numpy + Pillow preprocessing, prefixkv tokenizer
    assert runner.vision["tokens_per_image"] == TOKENS_PER_IMAGE
    for seed, size in enumerate([(40, 52), (52, 40), (32, 32), (17, 90), (300, 200)]):
        image = picture(seed, size)
        prompt = f"<image>\n{QUESTIONS[seed % 3]}"
        want = processor(images=[image], text=[prompt], return_tensors="np")
        np.testing.assert_array_equal(runner.preprocess([image]), want["pixel_values"])
        assert runner.encode_image_prompt(prompt, 1) == want["input_ids"][0].tolist()
    chat = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}],
                                         add_generation_prompt=True, tokenize=False)
    assert runner.encode_image_prompt("Hi?", 1, chat=True) == processor(images=[picture(0)], text=[chat])["input_ids"][0]


def test_placeholder_errors(llava):
    from prefixkv.engines.torch import TorchVisionRunner

    folder, model, _, _ = llava
    runner = TorchVisionRunner(model, folder)
    with pytest.raises(ImageError, match="2 <image> placeholders but 1 image"):
        runner.encode_image_prompt("<image> and <image>", 1)
    with pytest.raises(ImageError, match="no image was given"):
        runner.encode_image_prompt("<image>\nWhat?", 0)
    with pytest.raises(ImageError, match="holds no <image> placeholder"):
        runner.encode_image_prompt("What?", 1)
    with pytest.raises(ImageError, match="2 <image> placeholders but 1 image"):
        runner.encode_image_prompt("<image> and <image>", 1, chat=True)
    assert runner.encode_image_prompt("<image>\nWhat?", 1, chat=True) == runner.encode_image_prompt("What?", 1, chat=True)
    ids = runner.encode_image_prompt("<image>\nWhat?", 1)
    with pytest.raises(ImageError, match="16 image tokens but 2 image"):
        runner.prefill(*runner.pad([ids]), runner.preprocess([picture(0), picture(1)]))


# -- the cache and every policy with images -------------------------------------------------------
@pytest.mark.parametrize("method", ["streaming", "h2o", "snapkv", "tova", "pyramidkv", "prefixkv-online", "prefixkv"])
def test_every_policy_takes_images(llava, method):
    from prefixkv import PrefixKVCache
    from prefixkv.profile import Fingerprint, LayerKeep, RetentionProfile

    _, model, processor, data = llava
    inputs = processor(images=[picture(3)], text=[f"<image>\n{QUESTIONS[0]}"], return_tensors="pt")
    profile = RetentionProfile(Fingerprint.of(model.config), sink=2, calibrated={0.5: LayerKeep([0.4, 0.6], [0.0, 0.0])})
    cache = PrefixKVCache(profile if method == "prefixkv" else None, keep_fraction=0.5, method=method, sink=2)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4
    prompt = inputs["input_ids"].shape[1]
    assert int(cache.layer_lengths().max()) < prompt + 4  # compressed
    if method == "prefixkv":
        # prefill compaction kept round(f_l x S) per layer; decode stayed within the budget
        assert all(p.shape[-1] <= round(f * (prompt + 3)) + 1 for p, f in zip(cache.kept_positions(), [0.4, 0.6]))


# -- calibration ----------------------------------------------------------------------------------
def test_calibration_image_share_is_what_the_cache_keeps(llava, tmp_path):
    from prefixkv import PrefixKVCache
    from prefixkv.vision.calibration import (
        calibrate_vision,
        model_inputs,
        plot_image_share,
    )
    from prefixkv.vision.data import load_samples

    _, model, processor, data = llava
    samples = load_samples(data / "llava.json", first_turn_only=True)[:3]
    run = calibrate_vision(model, processor, samples, [0.3, 0.6], ["accumulated", "last-query"], search=SearchSettings(sink=2),
                           progress=False)
    profile = run.profiles["accumulated"]
    assert profile.calibration["images"] == 3 and "image_share" in profile.calibration
    assert 0 < run.prompt_image_share < 1
    for kf in (0.3, 0.6):
        assert abs(np.mean(profile.layer_fractions(kf)) - kf) < 1e-4
    # the share reported for one sample equals the share of image tokens among the entries
    # a PrefixKVCache with that profile keeps
    single = calibrate_vision(model, processor, samples[:1], [0.3], ["accumulated"], search=SearchSettings(sink=2), progress=False)
    inputs = model_inputs(processor, samples[0])
    cache = PrefixKVCache(single.profiles["accumulated"], keep_fraction=0.3)
    with torch.no_grad():
        model(**inputs, past_key_values=cache, use_cache=True)
    is_image = inputs["input_ids"][0] == IMAGE_TOKEN_ID
    kept = [float(is_image[p[0]].float().mean()) for p in cache.kept_positions()]
    assert single.image_share["accumulated"][0.3] == pytest.approx(kept, abs=1e-6)
    paths = plot_image_share(run, tmp_path / "report")
    assert [p.name for p in paths] == ["image_share.accumulated.png", "image_share.last-query.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


# -- evaluation (the paper's protocol) ------------------------------------------------------------
def test_evaluate_vision_protocol(llava):
    from prefixkv.evaluation import EvalSettings, MethodConfig, evaluate
    from prefixkv.vision.data import load_samples

    _, model, processor, data = llava
    samples = load_samples(data / "llava.json", first_turn_only=True)[:2]
    full = evaluate(model, processor, samples[:1], MethodConfig("full"), 1.0, EvalSettings(max_new_tokens=3, progress=False))
    assert full["rouge_l"] == 1.0 and full["ppl"] == pytest.approx(full["ppl_full"]) and full["images"] == 1
    h2o = evaluate(model, processor, samples, MethodConfig("h2o", sink=2), 0.3, EvalSettings(max_new_tokens=6, progress=False))
    assert h2o["per_sample"][0]["ppl_full"] == pytest.approx(full["ppl"]) and np.isfinite(h2o["ppl"])
    assert h2o["images"] == 2 and h2o["ppl"] != pytest.approx(h2o["ppl_full"])
    assert 0 <= h2o["rouge_l"] <= 1 and h2o["kv_fraction"] < 0.4
    assert h2o["per_sample"][0]["image_tokens"] == TOKENS_PER_IMAGE


# -- the engine -----------------------------------------------------------------------------------
def test_build_calibrates_exports_and_validates(engine):
    out, result = engine
    assert result.passed, json.dumps(result.validation, indent=1)[:3000]
    checks = result.validation["checks"]
    assert checks["graph"]["kept_positions_identical"] and checks["generation"]["kept_positions_identical"]
    assert all(checks["generation"]["agree"]) and checks["vision"]["images"] == 2
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["vision"]["tokens_per_image"] == TOKENS_PER_IMAGE and manifest["vision"]["image_token_id"] == IMAGE_TOKEN_ID
    names = [i["name"] for i in manifest["graphs"]["decoder"]["inputs"]]
    assert names[:8] == ["input_ids", "position_ids", "prompt_lengths", "past_widths", "score_from", "image_embeds",
                         "past.positions", "past.valid"]
    assert set(manifest["graphs"]) == {"vision", "decoder", "compact"}
    for name in ("vision.onnx", "processor_config.json", "chat_template.jinja", "tokenizer.json", "profile.json"):
        assert name in manifest["files"]
    assert json.loads((out / "profile.json").read_text())["calibration"]["images"] == 4


def test_engine_agrees_with_reference_on_a_new_image(engine, llava):
    from prefixkv.engines import load_runner
    from prefixkv.engines.validate import lockstep

    out, _ = engine
    _, model, processor, _ = llava
    ort = load_runner(out)
    ref = load_runner(out, backend="torch", model=model, processor=processor)
    prompts = [f"<image>\n{QUESTIONS[1]}", f"<image>\n{QUESTIONS[2]} Please be brief and precise."]
    images = [picture(11, (64, 48)), picture(12, (30, 80))]
    pixels = ort.preprocess(images)
    np.testing.assert_allclose(pixels, ref.preprocess(images))  # numpy pipeline == the model's processor
    token_lists = [ort.encode_image_prompt(p, 1) for p in prompts]
    with ort.images(pixels), ref.images(pixels):
        result = lockstep(ort, ref, token_lists, steps=8)
    assert result["kept_positions_identical"] and not any(result["mismatches"]), result
    # the batched engine output equals one-prompt-at-a-time generation (images follow their rows)
    from prefixkv.engines.base import GenerationConfig

    config = GenerationConfig(max_new_tokens=6, ignore_eos=True)
    batched = ort.generate(prompts, config, images=[[images[0]], [images[1]]])
    single = [ort.generate(p, config, images=[im])[0] for p, im in zip(prompts, images)]
    assert [g.token_ids for g in batched] == [g.token_ids for g in single] == [t[:6] for t in result["tokens"]]


def test_a_full_cache_vision_engine_shares_its_slots(llava, tmp_path):
    """Keep 1 on the LLaVA model (every layer keeps every entry): its decoder takes one set of
    slots for all layers, as a text engine's, and the engine validates against the PyTorch
    reference with images (graph, greedy lockstep); a batch of two image prompts of different
    lengths generates as each prompt alone, through the buffer growth after the prefill."""
    import onnx

    from prefixkv.engine_folder import SLOTS_KEY
    from prefixkv.engines import load_runner
    from prefixkv.engines.base import GenerationConfig
    from prefixkv.engines.validate import ValidationConfig
    from prefixkv.pipeline import BuildConfig, build_engine
    from prefixkv.profile import Fingerprint, LayerKeep, RetentionProfile
    from prefixkv.vision.data import load_samples

    folder, model, processor, data = llava
    layers = model.config.get_text_config().num_hidden_layers
    profile = RetentionProfile(Fingerprint.of(model.config), sink=2, calibrated={1.0: LayerKeep([1.0] * layers, [0.0] * layers)})
    samples = load_samples(data / "llava.json", first_turn_only=True)
    validation = ValidationConfig(samples=samples[:2], max_new_tokens=8)
    config = BuildConfig(str(folder), tmp_path / "llava-k100", 1.0, profile=profile, validation=validation)
    result = build_engine(config, model=model, tokenizer=processor, log=lambda m: None)
    assert result.passed, json.dumps(result.validation, indent=1)[:3000]
    assert result.validation["checks"]["vision"]["images"] == 2
    proto = onnx.load(str(result.path / "decoder.onnx"), load_external_data=False)
    assert {p.key: p.value for p in proto.metadata_props}[SLOTS_KEY] == "shared"

    runner = load_runner(result.path, verify=False)
    prompts = [f"<image>\n{QUESTIONS[0]}", f"<image>\n{QUESTIONS[2]} Please be brief, precise and complete."]
    images = [[picture(21, (44, 40))], [picture(22, (50, 30))]]
    config = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    batched = runner.generate(prompts, config, images=images)
    single = [runner.generate(p, config, images=im)[0] for p, im in zip(prompts, images)]
    assert len({len(runner.encode_image_prompt(p, 1)) for p in prompts}) == 2  # two lengths: one row has empty slots
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]


def test_generate_cli_with_image(engine, llava, tmp_path, capsys):
    from prefixkv.cli import main
    from prefixkv.engines import load_runner
    from prefixkv.engines.base import GenerationConfig

    out, _ = engine
    _, _, _, data = llava
    image = data / "images" / "2.png"
    assert main(["vision", "generate", str(out), "--image", str(image), "--prompt", "<image>\nWhat is this?",
                 "--max-new-tokens", "5"]) == 0
    captured = capsys.readouterr()
    expected = load_runner(out).generate("<image>\nWhat is this?", GenerationConfig(max_new_tokens=5), images=[image])[0]
    assert captured.out == expected.text + "\n"
    assert "1 image(s) of 16 tokens" in captured.err

    # bad input: one line each, exit 2
    cases = [
        (["--image", str(tmp_path / "nope.png"), "--prompt", "<image>\nq"], "no image at"),
        (["--image", str(image), "--prompt", "<image> <image> q"], "2 <image> placeholders but 1 image"),
        (["--image", str(image), "--prompt", "no placeholder"], "holds no <image> placeholder"),
        (["--prompt", "<image>\nq"], "no image was given"),
    ]
    for extra, message in cases:
        assert main(["vision", "generate", str(out), *extra]) == 2
        assert message in capsys.readouterr().err
    # a text-only engine (the same folder with the manifest's vision entry removed)
    text_engine = tmp_path / "text-engine"
    shutil.copytree(out, text_engine)
    manifest = json.loads((text_engine / "manifest.json").read_text())
    del manifest["vision"], manifest["graphs"]["vision"], manifest["files"]["vision.onnx"], manifest["files"]["vision.onnx.data"]
    (text_engine / "manifest.json").write_text(json.dumps(manifest))
    assert main(["vision", "generate", str(text_engine), "--image", str(image), "--prompt", "<image>\nq"]) == 2
    assert "text-only engine" in capsys.readouterr().err


def test_serving_image_input(engine, llava):
    import io

    from prefixkv.engines import load_runner
    from prefixkv.vision.serving import image_request

    out, _ = engine
    runner = load_runner(out, verify=False)
    buffer = io.BytesIO()
    picture(5).save(buffer, format="PNG")
    ids, pixels = image_request(runner, "Describe it.", np.array([buffer.getvalue()], dtype=object), chat=True, max_new_tokens=4)
    assert ids == runner.encode_image_prompt("Describe it.", 1, chat=True)
    np.testing.assert_array_equal(pixels, runner.preprocess([picture(5)]))
    with pytest.raises(ImageError, match="not a readable image"):
        image_request(runner, "<image>\nq", np.array([b"garbage"], dtype=object))
    with pytest.raises(ImageError, match="text, send the encoded bytes|is text"):
        image_request(runner, "<image>\nq", np.array(["cat.png"], dtype=object))
    with pytest.raises(ImageError, match="text-only engine"):
        image_request(object(), "<image>\nq", np.array([buffer.getvalue()], dtype=object))


def test_cli_calibrate_and_eval(llava, tmp_path, capsys):
    from prefixkv.cli import main

    folder, _, _, data = llava
    profile = tmp_path / "profile.json"
    assert main(["vision", "calibrate", "--model", str(folder), "--data", str(data / "llava.json"), "--first-turn-only",
                 "--samples", "2", "--keep", "0.5", "--sink", "2", "--output", str(profile), "--chat"]) == 0
    err = capsys.readouterr().err
    assert "image share of kept entries (accumulated, keep 0.5)" in err
    assert (tmp_path / "profile_report" / "image_share.accumulated.png").is_file()
    assert main(["vision", "eval", "--model", str(folder), "--data", str(data / "llava.json"), "--samples", "1",
                 "--profile", str(profile), "--keep", "0.5", "--max-new-tokens", "3", "--chat"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["method"] == "prefixkv" and result["images"] == 1 and np.isfinite(result["ppl"])
    # an uncalibrated keep fraction: one line naming the calibrated ones
    assert main(["vision", "eval", "--model", str(folder), "--data", str(data / "llava.json"),
                 "--method", "prefixkv", "--keep", "0.3", "--profile", str(profile)]) == 2
    assert "keep fraction 0.3 is not in this profile" in capsys.readouterr().err


def test_runtime_imports_without_torch_or_transformers(engine, llava):
    """What Triton's Python backend can import: the package (its lazy __init__) without torch or transformers."""
    import subprocess
    import sys


    out, _ = engine
    image = llava[3] / "images" / "1.png"
    code = f"""
import sys, types
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
from prefixkv.engines import load_runner
from prefixkv.vision.serving import image_request
from prefixkv.engines.base import GenerationConfig
runner = load_runner({str(out)!r})
ids, pixels = image_request(runner, "<image>\\nWhat?", [open({str(image)!r}, "rb").read()], max_new_tokens=4)
with runner.images(pixels):
    print(runner.generate_ids([ids], GenerationConfig(max_new_tokens=4, ignore_eos=True))[0].token_ids)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    from prefixkv.engines import load_runner
    from prefixkv.engines.base import GenerationConfig

    expected = load_runner(out).generate("<image>\nWhat?", GenerationConfig(max_new_tokens=4, ignore_eos=True), images=[image])
    assert done.stdout.strip() == str(expected[0].token_ids)


def test_the_text_commands_take_vision_models_and_engines(engine, llava, tmp_path, capsys):
    """The same commands serve text and vision: the modality comes from the model or the engine."""
    from prefixkv.cli import main
    from prefixkv.vision import is_vision_engine, is_vision_source

    out, _ = engine
    folder, _, _, data = llava
    assert is_vision_engine(out) and is_vision_source(folder) and not is_vision_source(tmp_path)
    assert main(["generate", str(out), "--prompt", "<image>\nWhat?", "--max-new-tokens", "3",
                 "--image", str(data / "images" / "0.png")]) == 0
    assert "1 image(s) of 16 tokens" in capsys.readouterr().err
    assert main(["validate", str(out), "--validate-prompts", "2", "--validate-new-tokens", "4"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["passed"] is True
    assert main(["calibrate", "--model", str(folder), "--data", str(data / "llava.json"), "--samples", "2",
                 "--keep", "0.5", "--sink", "2", "--output", str(tmp_path / "p.json")]) == 0
    assert (tmp_path / "p.json").is_file()
    assert main(["eval", "--model", str(folder), "--data", str(data / "llava.json"), "--samples", "1",
                 "--method", "h2o", "--keep", "0.5", "--max-new-tokens", "2"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["method"] == "h2o"
    assert main(["calibrate", "--model", str(folder), "--keep", "0.5", "--output", str(tmp_path / "q.json")]) == 2
    assert "need image data: pass --data" in capsys.readouterr().err



@pytest.mark.serving
def test_triton_serves_the_vision_engine_with_an_image(engine, llava, tmp_path):
    """`prefixkv deploy` of the vision engine, a real tritonserver on loopback: a request with
    the encoded PNG bytes in the `image` input gets the engine's own greedy text; bad image
    requests get an error response and the server stays healthy."""
    import io

    from prefixkv.cli import main
    from prefixkv.engines import GenerationConfig, load_runner
    from prefixkv.serving.client import TritonRequestError, grpc_generate
    from prefixkv.serving.server import TritonServer

    out, _ = engine
    buffer = io.BytesIO()
    picture(7).save(buffer, format="PNG")
    png = buffer.getvalue()
    runner = load_runner(out, verify=False)
    ids = runner.encode_image_prompt("What is in the picture?", 1, chat=True)
    with runner.images(runner.preprocess([picture(7)])):
        expected = runner.generate_ids([ids], GenerationConfig(max_new_tokens=8))[0]

    repository = tmp_path / "triton_repo"
    assert main(["deploy", str(out), "--repository", str(repository), "--threads", "1"]) == 0
    assert 'name: "image"' in (repository / "prefixkv_llm" / "config.pbtxt").read_text()
    with TritonServer(repository) as server:
        server.wait_ready(timeout=180)
        replies = grpc_generate(server.grpc_url, "What is in the picture?", max_tokens=8, chat=True, image=png)
        assert replies[-1]["text_output"] == expected.text and replies[-1]["output_ids"] == expected.token_ids
        with pytest.raises(TritonRequestError, match="not a readable image"):
            grpc_generate(server.grpc_url, "<image>\nq", max_tokens=2, image=b"garbage")
        with pytest.raises(TritonRequestError, match="image"):  # two placeholders, one image
            grpc_generate(server.grpc_url, "<image>\n<image>\nq", max_tokens=2, image=png)
        again = grpc_generate(server.grpc_url, "What is in the picture?", max_tokens=8, chat=True, image=png)
        assert again[-1]["text_output"] == expected.text  # healthy after the bad requests
