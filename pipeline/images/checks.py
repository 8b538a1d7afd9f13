"""Which image files are worth decoding: the checks every decode path applies before any decoder sees a byte.

Every path (DALI GPU/CPU, torch GPU/CPU, and `images.views.load_rgb` for overlays and Grad-CAM) reads files
through `read_image_file` and judges them with `encoded_problem`, so all keep and skip the same files for
the same reasons: only regular files, opened with O_NONBLOCK so a FIFO never hangs the job; only whole JPEG
and PNG files, walked up to their end marker (truncated files are refused, trailing bytes are dropped); no
image above `max_pixels`, read from the header before any decoder allocates (a 1 MB PNG can declare 30000 x
30000 pixels); sound PNG chunk CRCs and pixel data, because torchvision's PNG decoder crashes the process
(SIGSEGV) on any libpng error; and no "Corrupt JPEG data" warning from one strict libjpeg-turbo pass at 1/8
scale, because no decoder we use reports that warning through its API (they keep the damaged picture).
A file whose first warning is a harmless one is kept and left to the decoder.
"""

from __future__ import annotations

import os
import stat
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.files import file_kind

DEFAULT_MAX_PIXELS = 50_000_000  # 50 megapixels: ~150 MB as RGB uint8, far above any face crop

_JPEG_START = b"\xff\xd8\xff"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Start-of-frame markers hold the size and component count; C4, C8 and CC share the range but are not frames.
_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE_MARKERS = frozenset(range(0xD0, 0xD8)) | {0x01}  # RSTn and TEM carry no length field
_START_OF_SCAN, _END_OF_IMAGE = 0xDA, 0xD9
_EXIF_ORIENTATION_TAG = 0x0112
# The libjpeg warnings that mean damaged image data, not an odd but intact file.
_CORRUPT_DATA_WARNINGS = ("Corrupt JPEG data", "Premature end of JPEG file")


class ImageProblem(ValueError):
    """A file that will not be decoded, with the reason a reader sees next to its name."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


@dataclass(frozen=True)
class ImageHeader:
    format: str  # "jpeg" | "png"
    width: int
    height: int
    components: int  # JPEG: colour components in the frame (1 gray, 3 YCbCr/RGB, 4 CMYK); PNG: 0
    orientation: int  # JPEG: the EXIF Orientation tag (1 when absent, 0 when unreadable); PNG: 1
    bit_depth: int  # 8 for JPEG; PNG: the IHDR bit depth (1, 2, 4, 8 or 16)
    end: int  # bytes up to and including the end-of-image marker or IEND chunk; the rest is trailing data


def read_image_file(path: str | Path) -> np.ndarray:
    """The file's bytes as uint8, read only when it is a regular file.

    Raises ImageProblem for a FIFO, device or folder, and OSError when it cannot be opened or read.
    """
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            raise ImageProblem(path, f"cannot read: not a regular file ({file_kind(mode)})")
        with os.fdopen(descriptor, "rb", closefd=False) as stream:
            return np.fromfile(stream, dtype=np.uint8)
    finally:
        os.close(descriptor)


def encoded_problem(data: np.ndarray, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> str | None:
    """Why these file bytes will not be decoded, or None when they hold a whole, sound JPEG or PNG."""
    header = checked_header(data, max_pixels)
    return header if isinstance(header, str) else None


def checked_header(data: np.ndarray, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> ImageHeader | str:
    """The header of bytes that pass every check, or the reason they do not."""
    header = parse_header(data)
    if isinstance(header, str):
        return header
    body_problem = jpeg_data_problem if header.format == "jpeg" else png_data_problem
    return pixel_problem(header, max_pixels) or body_problem(data[: header.end]) or header


def parse_header(data: np.ndarray) -> ImageHeader | str:
    """Size, layout and end of a JPEG or PNG, or why the bytes are not a whole one."""
    if data.size == 0:
        return "empty file"
    if data[:3].tobytes() == _JPEG_START:
        return parse_jpeg(data)
    if data[: len(_PNG_SIGNATURE)].tobytes() == _PNG_SIGNATURE:
        return parse_png(data)
    return "not a JPEG or PNG image"


def pixel_problem(header: ImageHeader, max_pixels: int | None) -> str | None:
    pixels = header.width * header.height
    if max_pixels is None or pixels <= max_pixels:
        return None
    return (f"too large: {header.width}x{header.height} pixels ({pixels / 1e6:.1f} megapixels) is above "
            f"the limit of {max_pixels / 1e6:g} megapixels (max_pixels)")


def parse_jpeg(data: np.ndarray) -> ImageHeader | str:
    """Walk the marker segments and the entropy-coded scans to the end-of-image marker."""
    size = len(data)
    width = height = components = 0
    orientation, position, seen_scan = 1, 2, False
    while True:
        if position + 2 > size:
            return "truncated JPEG (no end-of-image marker)"
        if data[position] != 0xFF:
            return f"corrupt JPEG header (no marker at byte {position})"
        marker = int(data[position + 1])
        if marker == 0xFF:  # fill byte ahead of a marker
            position += 1
            continue
        if marker == _END_OF_IMAGE:
            if not seen_scan:
                return "corrupt JPEG (end-of-image marker before any image data)"
            return ImageHeader("jpeg", width, height, components, orientation, 8, position + 2)
        if marker in _STANDALONE_MARKERS:
            position += 2
            continue
        if position + 4 > size:
            return "truncated JPEG (no end-of-image marker)"
        length = int(data[position + 2]) << 8 | int(data[position + 3])
        if length < 2:
            return f"corrupt JPEG header (segment length {length} at byte {position})"
        segment_end = position + 2 + length
        if segment_end > size:
            return "truncated JPEG (no end-of-image marker)"
        segment = data[position + 4: segment_end]
        if marker == 0xE1 and segment[:6].tobytes() == b"Exif\x00\x00":
            orientation = exif_orientation(segment[6:].tobytes())
        elif marker in _FRAME_MARKERS:
            if len(segment) < 6:
                return "corrupt JPEG header (short frame header)"
            height, width = struct.unpack(">HH", segment[1:5].tobytes())
            components = int(segment[5])
            if width == 0 or height == 0:
                return f"corrupt JPEG header (frame of {width}x{height} pixels)"
        elif marker == _START_OF_SCAN:
            if not width:
                return "corrupt JPEG header (image data before the frame header)"
            seen_scan = True
            next_marker = _end_of_scan(data, segment_end)
            if next_marker is None:
                return "truncated JPEG (no end-of-image marker)"
            position = next_marker
            continue
        position = segment_end


def _end_of_scan(data: np.ndarray, start: int) -> int | None:
    """Where the marker after an entropy-coded scan starts, or None when the data runs out first.

    Inside a scan every FF byte is followed by 00 (a stuffed FF), by a restart marker D0-D7, or by
    another FF (fill): any other byte after FF is the next marker.
    """
    body = data[start:]
    candidates = np.flatnonzero(body[:-1] == 0xFF)
    following = body[candidates + 1]
    markers = candidates[(following != 0x00) & (following != 0xFF) & ((following < 0xD0) | (following > 0xD7))]
    return start + int(markers[0]) if len(markers) else None


def parse_png(data: np.ndarray) -> ImageHeader | str:
    """Walk the chunks from IHDR to IEND."""
    size, position = len(data), len(_PNG_SIGNATURE)
    header = None
    while position + 8 <= size:
        length, kind = struct.unpack(">I4s", data[position: position + 8].tobytes())
        chunk_end = position + 12 + length  # length, type, data, CRC
        if length >= 2**31:
            return f"corrupt PNG (chunk length {length} at byte {position})"
        if header is None:
            if kind != b"IHDR" or length != 13 or chunk_end > size:
                return "corrupt PNG header (no IHDR chunk first)"
            width, height, bit_depth = struct.unpack(">IIB", data[position + 8: position + 17].tobytes())
            if width == 0 or height == 0:
                return f"corrupt PNG header (image of {width}x{height} pixels)"
            header = (width, height, bit_depth)
        if chunk_end > size:
            break
        if kind == b"IEND":
            width, height, bit_depth = header
            return ImageHeader("png", width, height, 0, 1, bit_depth, chunk_end)
        position = chunk_end
    return "truncated PNG (no IEND chunk)" if header else "corrupt PNG header (no IHDR chunk first)"


_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}  # by colour type
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_PNG_SIDE_LIMIT = 1_000_000  # libpng's default user limit on width and height
_ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
_INFLATE_PIECE = 1 << 20  # inflate in 1 MiB pieces: the check never holds a whole large image


def png_data_problem(png: np.ndarray) -> str | None:
    """Why a whole PNG's chunks or pixel data would make libpng fail, or None."""
    buffer = png.tobytes()
    position, image_data, has_palette = len(_PNG_SIGNATURE), [], False
    width, height, depth, colour_type, compression, filtering, interlace = struct.unpack(
        ">IIBBBBB", buffer[position + 8: position + 21])
    if depth not in _PNG_DEPTHS.get(colour_type, ()) or compression or filtering or interlace > 1:
        return (f"corrupt PNG header (bit depth {depth}, colour type {colour_type}, compression {compression}, "
                f"filter {filtering}, interlace {interlace})")
    if max(width, height) > _PNG_SIDE_LIMIT:
        return f"PNG of {width}x{height} pixels is beyond libpng's limit of {_PNG_SIDE_LIMIT} pixels a side"
    while position < len(buffer):
        length, kind = struct.unpack(">I4s", buffer[position: position + 8])
        body = buffer[position + 8: position + 8 + length]
        (crc,) = struct.unpack(">I", buffer[position + 8 + length: position + 12 + length])
        if zlib.crc32(kind + body) != crc:
            return f"corrupt PNG ({kind.decode('latin-1')} chunk fails its CRC)"
        if kind == b"IDAT":
            image_data.append(body)
        has_palette |= kind == b"PLTE"
        position += 12 + length
    if colour_type == 3 and not has_palette:
        return "corrupt PNG (palette image without a PLTE chunk)"
    bits_per_pixel = depth * _PNG_CHANNELS[colour_type]
    passes = _ADAM7 if interlace else [(0, 0, 1, 1)]
    row_sizes = []
    for x0, y0, dx, dy in passes:
        pass_width, pass_height = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if pass_width > 0 and pass_height > 0:
            row_sizes.append((pass_height, 1 + -(-pass_width * bits_per_pixel // 8)))
    return _inflate_problem(b"".join(image_data), row_sizes, check_filters=not interlace)


def _inflate_problem(stream: bytes, row_sizes: list[tuple[int, int]], check_filters: bool) -> str | None:
    """Inflate the IDAT stream piece by piece, checking its size and (non-interlaced) each row's filter byte."""
    expected = sum(rows * size for rows, size in row_sizes)
    inflater, produced = zlib.decompressobj(), 0
    row_size = row_sizes[0][1]
    try:
        pending = stream
        while True:
            piece = inflater.decompress(pending, _INFLATE_PIECE)
            pending = inflater.unconsumed_tail
            if check_filters and piece:
                first_row_start = -produced % row_size
                filters = np.frombuffer(piece, np.uint8)[first_row_start::row_size]
                if filters.size and filters.max() > 4:
                    return "corrupt PNG (a row with an unknown filter type)"
            produced += len(piece)
            if produced > expected:
                return "corrupt PNG (more pixel data than its size implies)"
            if not piece and not pending:
                break
    except zlib.error as error:
        return f"corrupt PNG (pixel data does not inflate: {error})"
    if not inflater.eof or produced < expected:
        return "corrupt PNG (not enough pixel data)"
    return None


def exif_orientation(tiff: bytes) -> int:
    """The Orientation tag of an EXIF block (1 when absent, 0 when the block is unreadable)."""
    byte_order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if byte_order is None:
        return 0
    try:
        (first_directory,) = struct.unpack_from(byte_order + "I", tiff, 4)
        (entries,) = struct.unpack_from(byte_order + "H", tiff, first_directory)
        for entry in range(first_directory + 2, first_directory + 2 + 12 * entries, 12):
            tag, _type, _count, value = struct.unpack_from(byte_order + "HHIH", tiff, entry)
            if tag == _EXIF_ORIENTATION_TAG:
                return value
    except struct.error:
        return 0
    return 1


def jpeg_data_problem(jpeg: np.ndarray) -> str | None:
    """libjpeg-turbo's "Corrupt JPEG data" verdict on a whole JPEG's entropy-coded data, or None.

    Decoded at the smallest DCT scale: the entropy decoder still reads every coefficient (the
    warnings come from there), but the inverse DCT and colour conversion cost almost nothing.
    """
    import simplejpeg

    try:
        simplejpeg.decode_jpeg(jpeg, colorspace="RGB", strict=True, min_width=1, min_height=1)
    except ValueError as error:
        message = str(error).strip()
        if message.startswith(_CORRUPT_DATA_WARNINGS):
            return f"corrupt JPEG data (libjpeg-turbo: {message})"
        # Any other complaint (an unsupported variant, a harmless warning) is the decoder's to judge.
    return None
