"""CLI: the flags the issue lists, their mapping onto Engine(...), argument errors, the console script."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

from semipd_server.cli import build_parser, engine_kwargs

FLAGS = [
    "--model-path",
    "--host",
    "--port",
    "--api-key",
    "--max-running-requests",
    "--max-queued-requests",
    "--mem-fraction-static",
    "--chunked-prefill-size",
    "--log-level",
    "--page-size",
    "--num-pages",
    "--context-length",
    "--served-model-name",
    "--drain-timeout",
    "--enable-semi-pd",
    "--sm-partition",
    "--prefill-sm-percent",
    "--decode-sm-percent",
    "--cuda-graph-max-bs",
    "--disable-cuda-graph",
    "--load-format",
    "--disable-radix-cache",
    "--disable-overlap-schedule",
]


def test_console_script_help_lists_flags() -> None:
    (entry,) = [
        e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "semipd-server"
    ]
    assert entry.value == "semipd_server.cli:main"
    script = Path(sys.executable).parent / "semipd-server"
    out = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    for flag in FLAGS:
        assert flag in out, flag
    assert "127.0.0.1" in out  # the default bind address is local


def test_defaults_and_engine_kwargs() -> None:
    args = build_parser().parse_args([])
    assert (args.host, args.port, args.api_key, args.max_queued_requests) == ("127.0.0.1", 30000, None, None)
    kw = engine_kwargs(
        build_parser().parse_args(
            [
                "--max-running-requests",
                "8",
                "--max-queued-requests",
                "0",
                "--chunked-prefill-size",
                "128",
                "--mem-fraction-static",
                "0.5",
                "--num-pages",
                "64",
                "--context-length",
                "1024",
            ]
        )
    )
    assert kw["core"] == "process"  # the engine core always runs in its own process behind the server
    assert (kw["max_running_requests"], kw["max_queued_requests"], kw["chunked_prefill_size"]) == (8, 0, 128)
    assert (kw["mem_fraction_static"], kw["num_pages"], kw["max_model_len"]) == (0.5, 64, 1024)
    assert (kw["mode"], kw["cuda_graph_max_bs"], kw["disable_cuda_graph"]) == ("unified", None, False)


def test_semi_pd_and_cuda_graph_flags() -> None:
    kw = engine_kwargs(build_parser().parse_args(
        ["--enable-semi-pd", "--sm-partition", "green", "--cuda-graph-max-bs", "32", "--disable-cuda-graph"]))
    assert (kw["mode"], kw["sm_partition"], kw["cuda_graph_max_bs"], kw["disable_cuda_graph"]) == (
        "semi-pd", "green", 32, True)
    assert kw["enable_radix_cache"] is True
    assert engine_kwargs(build_parser().parse_args(["--disable-radix-cache"]))["enable_radix_cache"] is False
    assert kw["disable_overlap_schedule"] is False
    assert engine_kwargs(build_parser().parse_args(["--disable-overlap-schedule"]))["disable_overlap_schedule"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--max-running-requests", "0"],
        ["--max-queued-requests", "-1"],
        ["--log-level", "loud"],
        ["--port", "x"],
        ["--mode", "split"],
        ["--cuda-graph-max-bs", "0"],
        ["--load-format", "random"],
    ],
)
def test_bad_flags_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2
    assert argv[0] in capsys.readouterr().err
