"""What MONAI Label's ``GET /train`` status shows of a refused training option: monailabel 0.8.5 runs each ``/train``
in a process of its own (``python -m monailabel.interfaces.utils.app -m train``) and keeps the last 20 lines of its
output as the task's ``details``. The refusal's reason must be among them, not only in the server log above MONAI's
traceback."""

from __future__ import annotations

import json
import os
import sys

import preloaded_python
import pytest
from conftest import BTCV_BUNDLE, REPO

MSD_BUNDLE = REPO / "bundles" / "swin_unetr_msd"

# monailabel's training process, call for call: monailabel imported, then BundleTrainTask's monai.bundle.run with the
# bundle's displayable_configs taken from the request (here with a window edge the network cannot take)
TRAINING_PROCESS = """
import json, sys, types
sys.modules["monailabel"] = types.ModuleType("monailabel")
import monai.bundle
from monai.bundle import ConfigParser

bundle, request, records = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
config = ConfigParser()
config.read_config(bundle + "/configs/train.json")
config.config.update({"bundle_root": bundle})
shown = config.get_parsed_content("displayable_configs", instantiate=True)
monai.bundle.run(
    run_id="run", init_id=None, final_id=None, meta_file=bundle + "/configs/metadata.json",
    config_file=bundle + "/configs/train.json", bundle_root=bundle, device="cpu",
    displayable_configs={c: request[c] for c in shown},
    **{"train#dataset#data": records[:2], "validate#dataset#data": records[2:], "train#trainer#max_epochs": 1},
)
"""


@pytest.mark.parametrize("bundle", [BTCV_BUNDLE, MSD_BUNDLE])
def test_a_refused_option_is_in_the_last_lines_monai_label_keeps(bundle, synthetic_dataset):
    request = {"num_samples": 1, "num_workers": 0, "cache_rate": 0.0, "roi_edge": 80, "feature_size": 12}
    request["val_interval"] = 1
    datalist = json.loads((synthetic_dataset / "dataset_0.json").read_text())
    cases = datalist["training"] + datalist["validation"]
    records = [{k: str(synthetic_dataset / v) for k, v in c.items()} for c in cases]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-c", TRAINING_PROCESS, str(bundle), json.dumps(request), json.dumps(records)]
    result = preloaded_python.run(cmd, cwd="/", env=env, timeout=300)
    assert result.returncode != 0
    details = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()][-20:]
    assert details[-1].startswith("ValueError: roi_edge 80: the window's edge must be a multiple of 32"), details
