"""Pure parts of the agent: CPU name parsing, the memory estimate, the mDNS TXT record, sizes."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from agent.advertise import txt_record
from agent.capabilities import STAGE_RESERVE_BYTES, parse_cpu_model, stage_memory_bytes
from agent.cli import _size
from engine import wire

X86 = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Core(TM) i7-8650U CPU @ 1.90GHz\n"
JETSON = "processor\t: 0\nBogoMIPS\t: 62.50\nCPU part\t: 0xd42\n\nModel\t\t: NVIDIA Jetson Orin Nano Developer Kit\n"
PI = "processor\t: 0\nHardware\t: BCM2835\nRevision\t: d04170\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0\n"


@pytest.mark.parametrize("text, expected", [
    (X86, "Intel(R) Core(TM) i7-8650U CPU @ 1.90GHz"),
    (JETSON, "NVIDIA Jetson Orin Nano Developer Kit"),
    (PI, "Raspberry Pi 5 Model B Rev 1.0"),
    ("", ""),
])
def test_parse_cpu_model(text, expected):
    assert parse_cpu_model(text) == expected


def test_stage_memory_counts_the_requested_dtype():
    entry = wire.TensorEntry("w", "F32", (1024, 1024), 4 * 2**20, "0" * 64)
    msg = wire.HostStage(model="m", bundle="0" * 64, start=0, end=1, dtype="bf16", stage_index=0, n_stages=1,
                         next_endpoint="tcp://h:1", next_key="k", prev_key="k", config_json="{}", tensors=(entry,))
    assert stage_memory_bytes(msg) == 2 * 2**20 + STAGE_RESERVE_BYTES


def test_txt_record_holds_identity_only_and_respects_the_limit():
    props = txt_record("ag-0123456789abcdef", "jetson", 5555, "0123456789abcdef")
    assert props == {"id": "ag-0123456789abcdef", "name": "jetson", "proto": "FLOWSPEC1", "ctl_port": "5555",
                     "fp": "0123456789abcdef"}
    with pytest.raises(ValueError, match="shorter --name"):
        txt_record("ag-1", "n" * 260, 5555, "f" * 16)


@pytest.mark.parametrize("text, value", [("6G", 6 * 2**30), ("512M", 512 * 2**20), ("1.5GiB", int(1.5 * 2**30)),
                                         ("1000", 1000)])
def test_sizes(text, value):
    assert _size(text) == value


def test_bad_size_says_what_to_write():
    with pytest.raises(argparse.ArgumentTypeError, match="e.g. 6G"):
        _size("lots")


@pytest.mark.parametrize("module", ["agent.daemon", "engine.discovery"])
def test_agent_modules_never_import_qt(module):
    code = f"import sys, {module}; assert 'PySide6' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
