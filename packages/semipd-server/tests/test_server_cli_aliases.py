"""vLLM / SGLang spellings of the flags reach the same EngineConfig as ours; accepted no-op flags; --port bounds;
the SM partition picked for semi-pd when --sm-partition is not given."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from semipd_runtime.config import EngineConfig
from semipd_server.cli import build_parser, engine_kwargs, sm_partition_for


def config(argv: list[str]) -> EngineConfig:
    return EngineConfig.from_knobs(**engine_kwargs(build_parser().parse_args(argv)))


def resolved(argv: list[str]) -> EngineConfig:
    return config(argv).resolved(max_position_embeddings=2048, eos_token_ids=[2], model_path="m",
                                 cuda_available=False)


# (alias, canonical, value): the alias must land on exactly what the canonical flag sets, and on a non-default
ALIASES = [
    ("--model", "--model-path", "/models/x"),
    ("--max-model-len", "--context-length", "1000"),
    ("--gpu-memory-utilization", "--mem-fraction-static", "0.5"),
    ("--max-num-seqs", "--max-running-requests", "7"),
    ("--max-num-batched-tokens", "--chunked-prefill-size", "96"),
    ("--tokenizer", "--tokenizer-path", "/tok"),
    ("--tp", "--tp-size", "2"),
    ("--tensor-parallel-size", "--tp-size", "2"),
]


@pytest.mark.parametrize(("alias", "canonical", "value"), ALIASES)
def test_alias_reaches_the_same_setting(alias: str, canonical: str, value: str) -> None:
    assert resolved([alias, value]) == resolved([canonical, value])
    assert config([alias, value]) == config([canonical, value]) != config([])  # and the flag did set something


def test_new_engine_flags() -> None:
    cfg = resolved(["--seed", "7", "--chat-template", "{{ messages }}", "--tokenizer-path", "/t"])
    assert (cfg.model.seed, cfg.model.chat_template, cfg.model.tokenizer_path) == (7, "{{ messages }}", "/t")
    assert resolved([]).model.seed is None


def test_server_flags() -> None:
    args = build_parser().parse_args(["--served-model-name", "a", "b", "--log-level", "DEBUG", "--enable-metrics",
                                      "--trust-remote-code", "--port", "0"])
    assert (args.served_model_name, args.log_level, args.port) == (["a", "b"], "debug", 0)
    assert build_parser().parse_args(["--log-level", "Warning"]).log_level == "warning"


@pytest.mark.parametrize("port", ["99999", "-1", "65536"])
def test_port_out_of_range_is_an_argument_error(port: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["--port", port])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--port" in err and "65535" in err


def test_console_script_refuses_port_99999() -> None:
    script = Path(sys.executable).parent / "semipd-server"
    r = subprocess.run([str(script), "--port", "99999"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "argument --port: must be in [0, 65535], got 99999" in r.stderr


@pytest.mark.parametrize(
    ("argv", "cuda", "want"),
    [
        (["--enable-semi-pd"], True, "green"),  # a GPU without a partition would give semi-pd no isolation
        (["--mode", "semi-pd"], True, "green"),
        (["--enable-semi-pd"], False, "none"),  # CPU
        (["--enable-semi-pd", "--device", "cpu"], True, "none"),
        (["--enable-semi-pd", "--sm-partition", "mps"], True, "mps"),  # given: kept
        (["--enable-semi-pd", "--sm-partition", "none"], True, "none"),
        ([], True, "none"),  # unified mode has no partition
    ],
)
def test_sm_partition_default(argv: list[str], cuda: bool, want: str) -> None:
    args = build_parser().parse_args(argv)
    assert sm_partition_for(args, cuda) == want
    assert engine_kwargs(args, cuda)["sm_partition"] == want
