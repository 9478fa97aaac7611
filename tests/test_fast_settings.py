"""The speed settings the bundles default to change no result: SDPA attention gives the network's output, and the
CPU allocator set-up does what it says (checked through glibc's own accounting of mmapped memory)."""

from __future__ import annotations

import ctypes.util
import json
import os
import sys

import preloaded_python
import pytest
import torch
from conftest import BTCV_BUNDLE, REPO, SMALL_ROI
from monai.bundle import ConfigParser
from monai.networks.nets import SwinUNETR

# tune, then allocate a 64 MB block and read how much of the heap glibc serves by mmap
ALLOCATION = """
import ctypes, json, sys, torch
from swin_unetr_kit.runtime import tune_cpu_allocator
class MallInfo2(ctypes.Structure):
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(name, ctypes.c_size_t) for name in names.split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
runs = tune_cpu_allocator(sys.argv[1], keep_freed_memory=sys.argv[2] == "1")
block = torch.empty(64 * 2**20, dtype=torch.uint8)
print(json.dumps({"runs": runs, "mmapped": libc.mallinfo2().hblkhd}))
"""


def _allocate(device: str, keep: bool, **env: str) -> dict:
    cmd = [sys.executable, "-c", ALLOCATION, device, "1" if keep else "0"]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    result = preloaded_python.run(cmd, env={**environment, **env}, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_glibc_keeps_large_blocks_in_the_heap_only_when_asked():
    kept = _allocate("cpu", keep=True)
    assert kept["runs"] == "glibc, freed memory kept" and kept["mmapped"] < 64 * 2**20
    plain = _allocate("cpu", keep=False)
    assert plain["runs"] == "malloc" and plain["mmapped"] >= 64 * 2**20
    gpu = _allocate("cuda", keep=True)  # host allocator left alone for GPU runs
    assert gpu["runs"] == "cuda" and gpu["mmapped"] >= 64 * 2**20


@pytest.mark.skipif(not ctypes.util.find_library("tcmalloc_minimal"), reason="libtcmalloc-minimal4 not installed")
def test_a_preloaded_tcmalloc_is_recognised_and_kept():
    assert _allocate("cpu", keep=True, LD_PRELOAD="libtcmalloc_minimal.so.4")["runs"].startswith("libtcmalloc")


def test_sdpa_attention_gives_the_networks_output():
    torch.manual_seed(0)
    plain = SwinUNETR(in_channels=1, out_channels=14, feature_size=12).eval()
    sdpa = SwinUNETR(in_channels=1, out_channels=14, feature_size=12, use_flash_attention=True).eval()
    sdpa.load_state_dict(plain.state_dict())
    window = torch.rand(2, 1, *SMALL_ROI)
    with torch.no_grad():
        expected = plain(window)
        assert torch.allclose(sdpa(window), expected, atol=1e-4)
    # with gradients on (training) MONAI uses the plain attention path, so training is untouched
    assert torch.equal(sdpa.train()(window[:1]), plain.train()(window[:1]))


@pytest.mark.parametrize("config", ["train.json", "inference.json"])
def test_bundles_default_to_the_fast_settings(config):
    for bundle in (BTCV_BUNDLE, REPO / "bundles" / "swin_unetr_msd"):
        parser = ConfigParser()
        parser.read_config(str(bundle / "configs" / config))
        assert parser["network_def"]["use_flash_attention"] is True
        keep = parser["cpu_keep_freed_memory"]  # training: always; inference: where PyTorch runs the network
        assert keep is True if config == "train.json" else keep == "$@cpu_inference.runtime == 'torch'"
        assert any("tune_cpu_allocator" in step for step in parser["setup"])
