"""pipeline.infer.inputs without Ray: the files a batch inference run classifies, and errors that name the input."""

import pytest

from pipeline import infer

from infer_files import BROKEN_FILES, GOOD_FILES, random_image


def test_list_inputs_walks_a_directory(mixed_folder):
    expected = sorted(str(mixed_folder / relative) for relative in [*GOOD_FILES, *BROKEN_FILES])
    assert infer.list_inputs(str(mixed_folder)) == expected


def test_class_folders_the_model_does_not_know_are_named():
    from pipeline.infer.inputs import folders_not_in_classes

    classes = ["cat", "dog"]
    paths = ["/in/cat/1.png", "/in/dog/2.png", "/in/zebra/3.png", "/in/Dog/4.png"]
    assert folders_not_in_classes(paths, "/in", classes) == ["Dog", "zebra"]
    assert folders_not_in_classes(paths[:2], "/in", classes) == []  # all known: labelled
    assert folders_not_in_classes(["/in/2024/1.png", "/in/2025/2.png"], "/in", classes) == []  # not class folders
    assert folders_not_in_classes(["/in/cat/1.png", "/in/3.png"], "/in", classes) == []  # files at the root too
    assert folders_not_in_classes(["/a/cat/1.png", "/b/horse/2.png"], None, classes) == ["horse"]  # a file list


def test_list_inputs_skips_what_the_data_stage_skips(tmp_path):
    # The same rule as preprocessing (pipeline.data.images.is_hidden): a macOS zip's __MACOSX/
    # resource forks are not images to classify, nor are dot-files.
    for relative in ("cat/a.png", "__MACOSX/cat/._a.png", "__MACOSX/cat/b.png", ".cache/c.png", "cat/.d.png"):
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        random_image("RGB", (8, 8), 0).save(path, format="PNG")
    assert infer.list_inputs(str(tmp_path)) == [str(tmp_path / "cat/a.png")]


def test_list_inputs_single_file_glob_and_file_list(mixed_folder, tmp_path):
    one = str(mixed_folder / "photos/photo.jpg")
    assert infer.list_inputs(one) == [one]

    recursive = infer.list_inputs(f"{mixed_folder}/**/*.png")
    assert recursive == sorted(str(mixed_folder / relative) for relative in [*GOOD_FILES, *BROKEN_FILES]
                               if relative.endswith(".png"))  # case-sensitive like a shell; hidden skipped
    assert infer.list_inputs(f"{mixed_folder}/photos/*") == sorted(
        str(mixed_folder / relative) for relative in GOOD_FILES if relative.startswith("photos/"))

    listing = tmp_path / "lists" / "files.txt"
    listing.parent.mkdir()
    listing.write_text(f"# a comment\n\n{one}\n  ../elsewhere/missing.png  \n# {mixed_folder}/rgb.png\n")
    assert infer.list_inputs(str(listing)) == sorted([one, str(tmp_path / "elsewhere/missing.png")])


def test_list_inputs_errors_name_the_input(tmp_path, mixed_folder):
    with pytest.raises(FileNotFoundError, match="input not found: .*nowhere"):
        infer.list_inputs(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="input not found"):
        infer.list_inputs(str(tmp_path / "nowhere" / "*.png"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("no images here")
    with pytest.raises(ValueError, match=f"no images found in {tmp_path / 'empty'}"):
        infer.list_inputs(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="no images found"):
        infer.list_inputs(f"{mixed_folder}/**/*.png.nothing")
    with pytest.raises(ValueError, match="is not an image"):
        infer.list_inputs(str(mixed_folder / "readme.md"))
