"""glmv-build: engine directory layout, dtype re-save, safe rebuild, flag errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from build_engine.cli import default_preprocessing_instances, main, usable_cpu_cores


def run(*args: str) -> int:
    return main(list(args))


def test_build_tiny_engine(tmp_path: Path, tiny_checkpoint: Path) -> None:
    out = tmp_path / "engine"
    assert run("--checkpoint", str(tiny_checkpoint), "--output", str(out), "--max-seq-len", "1024") == 0
    for name in (
        "config.json",
        "engine_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "preprocessor_config.json",
        "generation_config.json",
    ):
        assert (out / name).is_file(), name
    config = json.loads((out / "engine_config.json").read_text())
    assert config["engine"]["max_model_len"] == 1024
    assert config["engine"]["dtype"] == "float32" and config["dummy"] is False
    assert config["preprocess"]["max_image_bytes"] == 10 * 1024 * 1024
    assert config["build"]["checkpoint"] == str(tiny_checkpoint.resolve())
    llm = (out / "model_repository" / "llm" / "config.pbtxt").read_text()
    assert f'string_value: "{out}"' in llm and "KIND_CPU" in llm and "decoupled: true" in llm
    pre = (out / "model_repository" / "preprocessing" / "config.pbtxt").read_text()
    instances = default_preprocessing_instances(usable_cpu_cores())  # one per two cores, 2 to 16
    assert f"count: {instances} kind: KIND_CPU" in pre
    assert config["build"]["preprocessing_instances"] == instances
    assert 'key: "pixels_by_reference" value: { string_value: "true" }' in pre
    assert 'key: "resize_on_device" value: { string_value: "false" }' in pre
    assert 'key: "lean_stream" value: { string_value: "true" }' in pre  # one postprocessing instance

    # The engine directory loads as an engine.
    from engine.llm_engine import LLMEngine

    ex = LLMEngine.from_engine_dir(out)
    assert ex.max_model_len == 1024

    # Rebuilding into the same folder replaces it; nothing is left beside it.
    flags = ("--preprocessing-instances", "3", "--no-pixels-by-reference", "--postprocessing-instances", "2")
    assert run("--checkpoint", str(tiny_checkpoint), "--output", str(out), *flags) == 0
    pre = (out / "model_repository/preprocessing/config.pbtxt").read_text()
    assert "count: 3 kind: KIND_CPU" in pre
    assert 'key: "pixels_by_reference" value: { string_value: "false" }' in pre
    assert 'key: "resize_on_device" value: { string_value: "false" }' in pre
    # two postprocessing instances: a stream's responses may meet either, so every response is whole
    assert 'key: "lean_stream" value: { string_value: "false" }' in pre
    post = (out / "model_repository/postprocessing/config.pbtxt").read_text()
    assert "count: 2 kind: KIND_CPU" in post
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]


def test_preprocessing_instances_follow_the_usable_cores(tmp_path: Path, monkeypatch) -> None:
    """One instance per two usable cores, 2 to 16; a container's CPU quota (cgroup v2 cpu.max) caps the
    cores of the affinity mask, rounded up; "max" (no quota) and an unreadable file leave them."""
    from build_engine import cli

    assert [cli.default_preprocessing_instances(c) for c in (1, 2, 4, 5, 16, 32, 33, 64)] == [
        2, 2, 2, 2, 8, 16, 16, 16,
    ]  # fmt: skip
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: set(range(12)))
    cpu_max = tmp_path / "cpu.max"
    assert cli.usable_cpu_cores(cpu_max) == 12  # no such file
    for text, cores in (
        ("max 100000\n", 12),
        ("250000 100000\n", 3),
        ("400000 100000\n", 4),
        ("50000 100000", 1),
    ):
        cpu_max.write_text(text)
        assert cli.usable_cpu_cores(cpu_max) == cores, text
    cpu_max.write_text("2000000 100000")  # a quota over the mask: the mask
    assert cli.usable_cpu_cores(cpu_max) == 12


def test_dtype_resave(tmp_path: Path, tiny_checkpoint: Path) -> None:
    from safetensors import safe_open

    out = tmp_path / "bf16"
    assert run("--checkpoint", str(tiny_checkpoint), "--output", str(out), "--dtype", "bfloat16") == 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {str(f.get_tensor(k).dtype) for k in f.keys()}  # noqa: SIM118
    assert dtypes == {"torch.bfloat16"}
    assert json.loads((out / "engine_config.json").read_text())["engine"]["dtype"] == "bfloat16"


def test_dummy_full_has_no_weights(tmp_path: Path) -> None:
    out = tmp_path / "dummy"
    assert run("--preset", "dummy-full", "--output", str(out), "--device", "cuda", "--gpus", "0,1") == 0
    config = json.loads((out / "engine_config.json").read_text())
    assert config["dummy"] is True and config["engine"]["dtype"] == "bfloat16"
    assert config["engine"]["vision_cuda_graphs"] is True and config["engine"]["async_vision"] is False
    assert config["engine"]["decode_gemv"] is True and config["engine"]["decode_pdl"] is False
    assert config["engine"]["vision_attention"] == "auto"
    # a CUDA build resizes new images on its GPU unless told not to, or unless they go by value
    pre = (out / "model_repository/preprocessing/config.pbtxt").read_text()
    assert 'key: "resize_on_device" value: { string_value: "true" }' in pre
    flags = (
        "--no-vision-cuda-graphs",
        "--async-vision",
        "--no-decode-gemv",
        "--decode-pdl",
        "--no-resize-on-device",
    )
    assert run("--preset", "dummy-full", "--output", str(out), "--device", "cuda", *flags) == 0
    engine = json.loads((out / "engine_config.json").read_text())["engine"]
    assert engine["vision_cuda_graphs"] is False and engine["async_vision"] is True
    assert engine["decode_gemv"] is False and engine["decode_pdl"] is True
    pre = (out / "model_repository/preprocessing/config.pbtxt").read_text()
    assert 'key: "resize_on_device" value: { string_value: "false" }' in pre
    for flags, pdl in (
        (["--decode-pdl", "auto"], "auto"),
        (["--decode-pdl=on"], True),
        (["--no-decode-pdl"], False),
    ):
        assert run("--preset", "dummy-full", "--output", str(out), "--device", "cuda", *flags) == 0
        assert json.loads((out / "engine_config.json").read_text())["engine"]["decode_pdl"] == pdl
    assert (
        run("--preset", "dummy-full", "--output", str(out), "--device", "cuda", "--no-pixels-by-reference")
        == 0
    )
    pre = (out / "model_repository/preprocessing/config.pbtxt").read_text()
    assert 'key: "resize_on_device" value: { string_value: "false" }' in pre
    assert run("--preset", "dummy-full", "--output", str(out), "--device", "cuda", "--gpus", "0,1") == 0
    assert not list(out.glob("*.safetensors"))
    llm = (out / "model_repository/llm/config.pbtxt").read_text()
    assert "{ count: 1 kind: KIND_GPU gpus: [ 0 ] },\n  { count: 1 kind: KIND_GPU gpus: [ 1 ] }" in llm
    # the one postprocessing instance's response budget (1000 per second) is split over the 2 GPUs
    assert 'key: "stream_responses_per_s" value: { string_value: "500" }' in llm
    vision = (out / "model_repository/vision_encoder/config.pbtxt").read_text()
    assert "gpus: [ 1 ]" in vision and "dims: [ -1, 4096 ]" in vision


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-batch-size", "0"], "--max-batch-size: 0 must be an integer >= 1"),
        (
            ["--max-seq-len", "99999999"],
            "--max-seq-len: 99999999 is over the model's max_position_embeddings",
        ),
        (
            ["--kv-cache-free-gpu-mem-fraction", "1.5"],
            "--kv-cache-free-gpu-mem-fraction: 1.5 must be in (0, 1]",
        ),
        (["--dtype", "int8"], "--dtype: 'int8' must be auto or one of"),
        (["--device", "tpu"], "--device: 'tpu' must be cpu or cuda"),
        (["--gpus", "0"], "--gpus: GPU instances need --device cuda"),
        (
            ["--no-pixels-by-reference", "--resize-on-device"],
            "--resize-on-device: needs --pixels-by-reference",
        ),
        (["--preprocessing-instances", "0"], "--preprocessing-instances: 0 must be >= 1"),
        (["--stream-responses-per-s", "0"], "--stream-responses-per-s: 0 must be >= 1"),
        (["--max-image-bytes", "0"], "--max-image-bytes: 0 must be an integer >= 1"),
        (
            ["--dtype", "fp8", "--fp8-tensorwise-rows", "-1"],
            "--fp8-tensorwise-rows: -1 must be an integer >= 0",
        ),
        (["--fp8-tensorwise-rows", "320"], "--fp8-tensorwise-rows: needs --dtype fp8"),
        (["--fp8-gemm-autotune"], "--fp8-gemm-autotune: needs --dtype fp8"),
        (["--min-image-pixels", "100", "--max-image-pixels", "10"], "--min-image-pixels: 100 must be <="),
    ],
)
def test_bad_flags_name_the_flag(tmp_path: Path, tiny_checkpoint: Path, capsys, flags, message) -> None:
    out = tmp_path / "engine"
    assert run("--checkpoint", str(tiny_checkpoint), "--output", str(out), *flags) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
    assert sorted(tmp_path.iterdir()) == []  # the temp build folder is gone too


def test_refuses_to_replace_a_non_engine_folder(tmp_path: Path, tiny_checkpoint: Path, capsys) -> None:
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    assert run("--checkpoint", str(tiny_checkpoint), "--output", str(tmp_path / "precious")) == 2
    assert "--output:" in capsys.readouterr().err
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


def test_dtype_fp8_means_bf16_activations_and_fp8_quantization(
    tmp_path: Path, tiny_checkpoint: Path, capsys
) -> None:
    from safetensors import safe_open

    out = tmp_path / "fp8"
    assert run("--checkpoint", str(tiny_checkpoint), "--output", str(out), "--dtype", "fp8") == 0
    assert "--dtype fp8 on --device cpu runs the dequantized path" in capsys.readouterr().err
    config = json.loads((out / "engine_config.json").read_text())
    assert config["engine"]["dtype"] == "bfloat16" and config["engine"]["quantization"] == "fp8"
    assert config["build"]["dtype"] == "bfloat16" and config["build"]["quantization"] == "fp8"
    with safe_open(str(out / "model.safetensors"), "pt") as f:  # quantized when the engine loads
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.bfloat16"}  # noqa: SIM118

    from engine.llm_engine import LLMEngine
    from engine.model.quant import Fp8Linear

    ex = LLMEngine.from_engine_dir(out)
    assert isinstance(ex.model.lm_head, Fp8Linear)
    assert isinstance(ex.model.language_model.layers[0].mlp.down_proj, Fp8Linear)
    assert config["engine"]["fp8_tensorwise_rows"] == 320 and config["engine"]["fp8_gemm_autotune"] is True

    assert (
        run(
            "--checkpoint",
            str(tiny_checkpoint),
            "--output",
            str(out),
            "--dtype",
            "fp8",
            "--fp8-tensorwise-rows",
            "384",
            "--no-fp8-gemm-autotune",
        )
        == 0
    )
    engine = json.loads((out / "engine_config.json").read_text())["engine"]
    assert engine["fp8_tensorwise_rows"] == 384 and engine["fp8_gemm_autotune"] is False
    capsys.readouterr()

    # other dtypes still write quantization "none"
    assert run("--checkpoint", str(tiny_checkpoint), "--output", str(out), "--dtype", "bfloat16") == 0
    assert json.loads((out / "engine_config.json").read_text())["engine"]["quantization"] == "none"
    assert "fp8" not in capsys.readouterr().err


def test_vision_dtype_fp8_quantizes_the_vit_when_the_engine_loads(
    tmp_path: Path, tiny_checkpoint: Path, capsys
) -> None:
    out = tmp_path / "vision-fp8"
    flags = ("--checkpoint", str(tiny_checkpoint), "--output", str(out), "--vision-dtype", "fp8")
    assert run(*flags, "--dtype", "bfloat16") == 0
    engine = json.loads((out / "engine_config.json").read_text())["engine"]
    assert (engine["dtype"], engine["quantization"], engine["vision_quantization"]) == (
        "bfloat16",
        "none",
        "fp8",
    )

    from torch import nn

    from engine.llm_engine import LLMEngine
    from engine.model.quant import Fp8Linear

    ex = LLMEngine.from_engine_dir(out)
    assert isinstance(ex.model.visual.blocks[0].mlp.down_proj, Fp8Linear)
    assert isinstance(ex.model.visual.merger.proj, Fp8Linear) and type(ex.model.lm_head) is nn.Linear
    # with the decoder's too; and float32 activations are refused, naming the flag
    assert run(*flags, "--dtype", "fp8") == 0
    engine = json.loads((out / "engine_config.json").read_text())["engine"]
    assert (engine["quantization"], engine["vision_quantization"]) == ("fp8", "fp8")
    capsys.readouterr()
    assert run(*flags, "--dtype", "float32") == 2
    assert (
        "--vision-dtype: fp8 needs a 16-bit activation dtype (bfloat16 or float16), not dtype 'float32'"
        in (capsys.readouterr().err)
    )


def test_dtype_fp8_on_cuda_dummy(tmp_path: Path, capsys) -> None:
    out = tmp_path / "dummy-fp8"
    assert run("--preset", "dummy-full", "--output", str(out), "--device", "cuda", "--dtype", "fp8") == 0
    assert "note" not in capsys.readouterr().err
    engine = json.loads((out / "engine_config.json").read_text())["engine"]
    assert engine["dtype"] == "bfloat16" and engine["quantization"] == "fp8" and engine["device"] == "cuda"


def test_bad_dtype_lists_fp8(tmp_path: Path, tiny_checkpoint: Path, capsys) -> None:
    out = tmp_path / "engine"
    assert run("--checkpoint", str(tiny_checkpoint), "--output", str(out), "--dtype", "fp4") == 2
    assert "--dtype: 'fp4' must be auto or one of ['bfloat16', 'float16', 'float32', 'fp8']" in (
        capsys.readouterr().err
    )


def test_decode_pdl_takes_on_off_or_auto(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--preset", "tiny", "--output", str(tmp_path / "engine"), "--decode-pdl", "sometimes"])
    assert exc.value.code == 2
    assert "argument --decode-pdl: invalid choice: 'sometimes' (choose from 'on', 'off', 'auto')" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "engine").exists()
