"""The rules of the export's arguments shared by save_distill_model, the stages and the pipeline's parameter
check (amct_core.arguments, save.normalize_dynamic_axes, verify.Tolerances): each refuses a bad value with
a message naming the argument."""
from __future__ import annotations

import pytest

from amct_core.arguments import NAME_MAX, OUTPUT_NAME_MAX, check_names, check_output_dir, check_output_file, check_path
from amct_core.errors import ExportError
from amct_core.save import normalize_dynamic_axes
from amct_core.verify.tolerances import Tolerances


def test_names_are_returned_as_a_list():
    assert check_names(("a", "b"), "input_names", 2) == ["a", "b"]
    assert check_names(None, "input_names", 2) is None


@pytest.mark.parametrize("names, words", [
    (["a", "a"], "input_names has duplicates"),
    (["a", ""], "input_names must be a list of non-empty strings"),
    ("ab", "input_names must be a list of non-empty strings"),
    (["a", "b", "c"], "input_names has 3 names but the model has 2 inputs"),
])
def test_bad_names_are_refused_naming_the_argument(names, words):
    with pytest.raises(ExportError, match=words):
        check_names(names, "input_names", 2, "inputs")


def test_a_path_with_a_nul_byte_is_refused_naming_the_argument():
    with pytest.raises(ExportError, match=r"^save_path 'out/a\\x00b' holds a NUL byte"):
        check_path("out/a\x00b", "save_path")


def test_a_path_component_over_the_file_system_limit_is_refused_naming_the_argument():
    check_path("out/" + "d" * NAME_MAX + "/m", "save_path")
    with pytest.raises(ExportError, match=rf"^save_path: the path component .* has {NAME_MAX + 1} bytes"):
        check_path("out/" + "d" * (NAME_MAX + 1) + "/m", "save_path")


def test_the_limit_counts_bytes_not_characters():
    with pytest.raises(ExportError, match=rf"has {2 * 128} bytes"):
        check_path("é" * 128, "name")  # 128 characters, 256 bytes in UTF-8


def test_an_output_file_name_leaves_room_for_its_temporary_and_data_files():
    check_output_file("out/" + "m" * OUTPUT_NAME_MAX, "save_path")
    with pytest.raises(ExportError, match=rf"^save_path: the output file name .* has {OUTPUT_NAME_MAX + 1} bytes"):
        check_output_file("out/" + "m" * (OUTPUT_NAME_MAX + 1), "save_path")


def test_an_output_dir_under_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(ExportError, match=r"^output_dir: cannot create directory .* is not a directory"):
        check_output_dir(tmp_path / "f" / "out", "output_dir")
    check_output_dir(tmp_path / "new" / "deeper", "output_dir")  # creatable: no error, nothing made
    assert not (tmp_path / "new").exists()


def test_dynamic_axes_out_of_an_inputs_rank_are_refused():
    with pytest.raises(ExportError, match=r"dynamic_axes\['x'\] = \[4\] is out of range for an input of rank 4"):
        normalize_dynamic_axes({"x": [4]}, ["x"], {"x": 4})
    assert normalize_dynamic_axes({"x": [0], "y": {1: "n"}}, ["x", "y"], {"x": 4}) == {
        "x": {0: "x_dynamic_axes_1"}, "y": {1: "n"}}


@pytest.mark.parametrize("overrides, words", [
    ({"output_cosine_min": None}, "tolerance 'output_cosine_min' must be a number, got None"),
    ({"layer_sqnr_min_db": "20"}, "tolerance 'layer_sqnr_min_db' must be a number"),
    ({"output_argmax_min": True}, "must be a number or None"),
    ({"nope": 1.0}, r"unknown tolerance\(s\) \['nope'\]"),
])
def test_bad_tolerances_are_refused_naming_the_tolerance(overrides, words):
    with pytest.raises(ValueError, match=words):
        Tolerances.from_dict(overrides)


def test_a_tolerance_that_may_be_unchecked_accepts_none():
    assert Tolerances.from_dict({"output_argmax_min": None}).output_argmax_min is None
