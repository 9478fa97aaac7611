"""Bad input gives an error naming the file and the problem, before any training starts."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from conftest import SMALL, configs, run_workflow, write_ct_case

from swin_unetr_kit.data import DataError, build_datalist, check_case, load_datalist, split_cases


def _dataset_with(tmp_path, case: dict) -> None:
    rel = {k: str(v) for k, v in case.items()}
    (tmp_path / "dataset_0.json").write_text(json.dumps({"training": [rel], "validation": [rel]}))


def test_missing_image(tmp_path):
    case = write_ct_case(tmp_path, "a")
    case["image"] = str(tmp_path / "imagesTr" / "missing.nii.gz")
    with pytest.raises(DataError, match=r"missing\.nii\.gz: file not found"):
        check_case(case)


def test_unreadable_image(tmp_path):
    case = write_ct_case(tmp_path, "a")
    with open(case["image"], "wb") as f:
        f.write(b"this is not a NIfTI file" * 10)
    with pytest.raises(DataError, match=r"a\.nii\.gz: cannot be read as NIfTI"):
        check_case(case)


def test_wrong_channel_count(tmp_path):
    case = write_ct_case(tmp_path, "two_channels", channels=2)
    with pytest.raises(DataError, match=r"two_channels\.nii\.gz: has 2 channels, the network expects 1"):
        check_case(case, in_channels=1)
    check_case(case, in_channels=2)  # right count, accepted


def test_label_with_other_shape(tmp_path):
    case = write_ct_case(tmp_path, "a")
    other = write_ct_case(tmp_path / "other", "a", shape=(40, 40, 40))
    case["label"] = other["label"]
    with pytest.raises(DataError, match=r"label shape \(40, 40, 40\) differs from image shape"):
        check_case(case)


def test_label_with_other_geometry(tmp_path):
    case = write_ct_case(tmp_path, "a")
    label = nib.load(case["label"])
    shifted = label.affine.copy()
    shifted[:3, 3] += 7.5
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj), shifted), case["label"])
    with pytest.raises(DataError, match=r"labelsTr/a\.nii\.gz: label geometry .* differs from the image"):
        check_case(case)


def test_label_in_another_axis_order_but_same_voxels_is_accepted(tmp_path):
    """DICOM-to-NIfTI conversions often flip an axis; the same voxels in world space are the same geometry."""
    case = write_ct_case(tmp_path, "a")
    label = nib.load(case["label"])
    flipped = nib.orientations.apply_orientation(np.asarray(label.dataobj), [[0, 1], [1, -1], [2, 1]])
    affine = label.affine @ nib.orientations.inv_ornt_aff(np.array([[0, 1], [1, -1], [2, 1]]), label.shape)
    nib.save(nib.Nifti1Image(flipped, affine), case["label"])
    check_case(case, num_classes=14)


def test_label_values_out_of_range(tmp_path):
    case = write_ct_case(tmp_path, "a")
    label = nib.load(case["label"])
    data = np.asarray(label.dataobj).copy()
    data[0, 0, 0] = 17
    nib.save(nib.Nifti1Image(data, label.affine), case["label"])
    with pytest.raises(DataError, match=r"a\.nii\.gz: label values \[17\] outside the 14 classes 0\.\.13"):
        check_case(case, num_classes=14)


def test_empty_datalist(tmp_path):
    (tmp_path / "dataset_0.json").write_text(json.dumps({"training": [], "validation": []}))
    with pytest.raises(DataError, match=r"the 'training' list is empty"):
        load_datalist(tmp_path, "training")


def test_unreadable_datalist(tmp_path):
    (tmp_path / "dataset_0.json").write_text("{not json")
    with pytest.raises(DataError, match=r"dataset_0\.json: not a readable JSON datalist"):
        load_datalist(tmp_path)


def test_images_without_labels_are_an_error(tmp_path):
    write_ct_case(tmp_path, "a")
    write_ct_case(tmp_path, "b")
    (tmp_path / "labelsTr" / "b.nii.gz").unlink()
    with pytest.raises(DataError, match=r"1 images have no label .*/b\.nii\.gz"):
        load_datalist(tmp_path)


def test_no_known_layout(tmp_path):
    with pytest.raises(DataError, match="no datalist"):
        load_datalist(tmp_path)
    with pytest.raises(DataError, match=r"missing_dir: data set folder not found"):
        load_datalist(tmp_path / "missing_dir")


def test_btcv_rawdata_layout_pairs_img_with_label(tmp_path):
    raw = tmp_path / "RawData" / "Training"
    for i in (1, 2, 3):
        case = write_ct_case(tmp_path / "tmp", f"img000{i}", label_name=f"label000{i}", seed=i)
        (raw / "img").mkdir(parents=True, exist_ok=True)
        (raw / "label").mkdir(parents=True, exist_ok=True)
        (tmp_path / "tmp" / "imagesTr" / f"img000{i}.nii.gz").rename(raw / "img" / f"img000{i}.nii.gz")
        (tmp_path / "tmp" / "labelsTr" / f"label000{i}.nii.gz").rename(raw / "label" / f"label000{i}.nii.gz")
        assert case
    lists = build_datalist(tmp_path, val_fraction=0.34, seed=0)
    pairs = lists["training"] + lists["validation"]
    assert len(pairs) == 3 and len(lists["validation"]) == 1
    for pair in pairs:
        assert pair["image"].replace("img", "label") == pair["label"]


def test_split_is_seeded_and_complete():
    cases = [{"image": f"c{i}.nii.gz"} for i in range(30)]
    a, b = split_cases(cases, 0.2, seed=1), split_cases(list(reversed(cases)), 0.2, seed=1)
    assert a == b  # independent of input order
    assert len(a["validation"]) == 6 and len(a["training"]) == 24
    assert sorted(c["image"] for c in a["training"] + a["validation"]) == sorted(c["image"] for c in cases)
    assert split_cases(cases, 0.2, seed=2) != a


def test_bad_label_stops_the_bundle_before_training(tmp_path):
    case = write_ct_case(tmp_path / "data", "bad")
    label = nib.load(case["label"])
    data = np.asarray(label.dataobj).copy()
    data[1, 1, 1] = 99
    nib.save(nib.Nifti1Image(data, label.affine), case["label"])
    _dataset_with(tmp_path / "data", case)
    with pytest.raises(Exception) as excinfo:
        run_workflow(
            configs("train"),
            **SMALL,
            bundle_root=str(tmp_path / "run"),
            dataset_dir=str(tmp_path / "data"),
            allow_datalist_overlap=True,  # the one case in both parts
        )
    chain, err = [], excinfo.value
    while err is not None:
        chain.append(err)
        err = err.__cause__
    data_errors = [e for e in chain if isinstance(e, DataError)]
    assert data_errors and "bad.nii.gz: label values [99]" in str(data_errors[0])
    assert not (tmp_path / "run" / "models").exists()  # nothing trained, nothing written
