"""The image-folder source: real DICOM files written with pydicom, PNG files, a labels CSV."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from peer.data import DataSource, ImageFolderSource, ImageSourceConfig, SourceError

CLASSES = ("no lesion", "lesion")


def write_dicom(path: Path, pixels: npt.NDArray[np.uint16], bits_stored: int = 12) -> None:
    """A single-frame MONOCHROME2 secondary-capture DICOM file, as a scanner archive has."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = path.stem
    ds.Modality = "OT"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def dicom_folder(root: Path, n: int = 12) -> tuple[ImageSourceConfig, dict[str, int]]:
    """``n`` 32x40 DICOM images, each a constant intensity 100*i (so the decoded value of
    each is known), half of them "lesion"; plus one corrupt file listed in the CSV."""
    folder = root / "scans"
    folder.mkdir()
    lines, values = ["file,label,split"], {}
    for i in range(n):
        name = f"patient_{i:02d}.dcm"
        write_dicom(folder / name, np.full((32, 40), 100 * i, dtype=np.uint16))
        lines.append(f"{name},{CLASSES[i % 2]},{'test' if i % 4 == 3 else 'train'}")
        values[name] = 100 * i
    (folder / "corrupt.dcm").write_bytes(b"DICM" + bytes(range(256)) * 4)
    lines.append("corrupt.dcm,lesion,train")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = ImageSourceConfig(
        folder=folder,
        labels_csv=folder / "labels.csv",
        image_size=(16, 16),
        classes=CLASSES,
        split_column="split",
        name="lesions",
    )
    return config, values


def test_a_dicom_folder_is_described_by_counts_never_pixels(tmp_path: Path) -> None:
    config, _ = dicom_folder(tmp_path)
    info = ImageFolderSource(config).describe()
    assert info.kind == "image"
    assert info.image_shape == info.input_shape == (16, 16, 1)
    assert info.label_names == CLASSES
    # 12 readable files: i % 4 == 3 (i = 3, 7, 11, all "lesion") are the test split.
    assert info.label_counts == {"train": {0: 6, 1: 3}, "test": {1: 3}}
    assert info.count() == 12
    skipped = [n for n in info.notes if "skipped" in n]
    assert len(skipped) == 1
    assert skipped[0].startswith("file 'corrupt.dcm' skipped: not a readable DICOM image")
    assert "native sizes: 32x40 (12)" in info.notes
    assert "pixels" not in str(info.as_json())  # metadata only: counts, shapes, notes


def test_dicom_images_are_decoded_normalized_and_resized_as_declared(tmp_path: Path) -> None:
    config, values = dicom_folder(tmp_path)
    source = ImageFolderSource(config)
    x, y = source.load("train")
    assert x.shape == (9, 16, 16, 1)
    assert x.dtype == np.float32
    # max_value: 12 bits stored, so a constant image of value v decodes to v / 4095.
    train = [n for i, n in enumerate(sorted(values)) if i % 4 != 3]
    expected = np.array([values[n] / 4095 for n in train], dtype=np.float32)
    np.testing.assert_allclose(x.reshape(9, -1).mean(axis=1), expected, rtol=1e-5)
    np.testing.assert_array_equal(y, [i % 2 for i in range(12) if i % 4 != 3])


def test_images_are_streamed_from_disk_not_held_in_memory(tmp_path: Path) -> None:
    """The dataset reads each file when it is iterated: a file rewritten after the
    ``tf.data`` pipeline was built is read with its new content."""
    config, _ = dicom_folder(tmp_path)
    source = ImageFolderSource(config)
    dataset = source.tf_dataset("test")  # patient_03, 07, 11
    write_dicom(config.folder / "patient_03.dcm", np.full((32, 40), 4095, dtype=np.uint16))
    first_image, first_label = next(iter(dataset))
    np.testing.assert_allclose(first_image.numpy(), 1.0)
    assert int(first_label) == 1


def test_min_max_and_three_channels(tmp_path: Path) -> None:
    config, _ = dicom_folder(tmp_path)
    folder = config.folder
    gradient = np.tile(np.arange(40, dtype=np.uint16) * 50 + 1000, (32, 1))
    write_dicom(folder / "patient_00.dcm", gradient)
    source: DataSource = ImageFolderSource(
        replace(config, normalization="min_max", channels=3, image_size=(8, 40))
    )
    image, _ = next(iter(source.tf_dataset("train")))
    pixels = image.numpy()
    assert pixels.shape == (8, 40, 3)
    np.testing.assert_allclose(pixels[..., 0], pixels[..., 2])
    assert pixels.min() == pytest.approx(0.0, abs=1e-6)
    assert pixels.max() == pytest.approx(1.0, abs=1e-6)


def write_png_folder(root: Path) -> ImageSourceConfig:
    import tensorflow as tf

    folder = root / "png"
    folder.mkdir(parents=True)
    lines = ["image,finding"]
    for i in range(10):
        value = 20 * i
        pixels = np.full((20, 24, 1), value, dtype=np.uint8)
        tf.io.write_file(str(folder / f"img{i}.png"), tf.io.encode_png(pixels))
        lines.append(f"img{i}.png,{i % 3}")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    lines.append("broken.png,0")
    lines.append("gone.png,1")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return ImageSourceConfig(
        folder=folder,
        labels_csv=folder / "labels.csv",
        image_size=(10, 12),
        file_column="image",
        label_column="finding",
        test_fraction=0.3,
    )


def test_a_png_folder_with_integer_labels_and_a_derived_split(tmp_path: Path) -> None:
    source = ImageFolderSource(write_png_folder(tmp_path))
    info = source.describe()
    assert info.label_names == ("0", "1", "2")
    assert info.count() == 10
    notes = " | ".join(info.notes)
    assert "file 'broken.png' skipped: not a readable PNG image" in notes
    assert "file 'gone.png' skipped: no such file" in notes
    x_train, y_train = source.load("train")
    x_test, _ = source.load("test")
    assert len(x_train) + len(x_test) == 10
    assert x_train.shape[1:] == (10, 12, 1)
    assert sum(info.label_counts["train"].values()) == len(y_train)
    # 8-bit PNG, max_value: value v decodes to v / 255 (constant images survive resizing)
    assert set(np.round(x_train.max(axis=(1, 2, 3)) * 255).astype(int)) <= {
        20 * i for i in range(10)
    }
    # The split depends only on the file name: a second scan agrees.
    again = ImageFolderSource(write_png_folder(tmp_path / "again"))
    assert again.describe().label_counts == info.label_counts


def test_labels_file_problems_are_named_and_nothing_is_used(tmp_path: Path) -> None:
    config, _ = dicom_folder(tmp_path)
    labels = config.labels_csv
    labels.write_text(
        labels.read_text(encoding="utf-8")
        + "../outside.dcm,lesion,train\npatient_01.dcm,tumour,train\npatient_02.dcm,lesion,val\n",
        encoding="utf-8",
    )
    with pytest.raises(SourceError) as caught:
        ImageFolderSource(config).describe()
    problems = [str(issue) for issue in caught.value.issues]
    assert len(problems) == 3
    assert problems[0].startswith("labels file line 15: file '../outside.dcm' is not inside")
    assert problems[1] == ("labels file line 16: label 'tumour' is not ['no lesion', 'lesion']")
    assert problems[2] == "labels file line 17: split 'val' is not train/test"


def test_absolute_paths_and_symlinks_out_of_the_folder_are_refused(tmp_path: Path) -> None:
    config, _ = dicom_folder(tmp_path)
    secret = tmp_path / "elsewhere.dcm"
    write_dicom(secret, np.zeros((4, 4), dtype=np.uint16))
    (config.folder / "link.dcm").symlink_to(secret)
    config.labels_csv.write_text(
        f"file,label,split\n{secret},lesion,train\nlink.dcm,lesion,train\n", encoding="utf-8"
    )
    with pytest.raises(SourceError) as caught:
        ImageFolderSource(config).describe()
    problems = [str(issue) for issue in caught.value.issues]
    assert problems[0].startswith(f"labels file line 2: file '{secret}' is not inside")
    assert problems[1].startswith("labels file line 3: file 'link.dcm' is not inside")


def test_a_labels_file_without_the_declared_columns(tmp_path: Path) -> None:
    config, _ = dicom_folder(tmp_path)
    with pytest.raises(SourceError, match="has no column 'diagnosis'"):
        ImageFolderSource(replace(config, label_column="diagnosis")).describe()


def test_a_folder_with_no_usable_image_is_an_error(tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.dcm").write_bytes(b"not dicom at all")
    (folder / "labels.csv").write_text("file,label\na.dcm,0\n", encoding="utf-8")
    config = ImageSourceConfig(folder=folder, labels_csv=folder / "labels.csv", image_size=(4, 4))
    with pytest.raises(SourceError, match=r"(?s)no usable image.*file 'a.dcm' skipped"):
        ImageFolderSource(config).describe()


def test_a_header_claiming_a_huge_image_is_skipped_before_decoding(tmp_path: Path) -> None:
    config, _ = dicom_folder(tmp_path)
    bomb = config.folder / "patient_00.dcm"
    write_dicom(bomb, np.zeros((4, 4), dtype=np.uint16))
    ds = pydicom.dcmread(bomb)
    ds.Rows, ds.Columns = 60000, 60000  # 7.2 GB of pixels claimed, 32 bytes present
    ds.save_as(bomb, enforce_file_format=True)
    notes = ImageFolderSource(config).describe().notes
    assert any(
        n.startswith("file 'patient_00.dcm' skipped") and "3600000000 pixel values declared" in n
        for n in notes
    )


def test_pydicom_reads_what_the_test_wrote(tmp_path: Path) -> None:
    """The fixture files are real DICOM (preamble, file meta), not something only our
    reader accepts."""
    path = tmp_path / "x.dcm"
    write_dicom(path, np.arange(12, dtype=np.uint16).reshape(3, 4))
    ds = pydicom.dcmread(path)
    assert path.read_bytes()[128:132] == b"DICM"
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    np.testing.assert_array_equal(ds.pixel_array, np.arange(12).reshape(3, 4))
