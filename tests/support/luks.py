"""Read a LUKS2 volume on the host without device-mapper (CI hosts may lack dm_mod).

cryptsetup itself checks the passphrase and hands out the volume key (`luksDump
--dump-volume-key`); the data segment is then decrypted here with the same cipher dm-crypt uses
(aes-xts-plain64: AES-XTS, the 512-byte sector number as the little-endian tweak) into a plain
file that debugfs reads. Ciphertext that is all zeros was never written (a sparse disk image),
and stays zeros: the file system never points at those blocks.
"""

from __future__ import annotations

import json
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from builder.run import run

_CHUNK = 1024 * 1024


def volume_key(device: Path, passphrase: str, work: Path) -> bytes:
    key_file = work / "volume.key"
    key_file.unlink(missing_ok=True)
    run(
        [
            "cryptsetup",
            "luksDump",
            "--dump-volume-key",
            f"--volume-key-file={key_file}",
            "--batch-mode",
            "--key-file=-",
            device,
        ],
        input=passphrase.encode(),
        capture=True,
    )
    try:
        return key_file.read_bytes()
    finally:
        key_file.unlink()


def decrypt_volume(device: Path, passphrase: str, output: Path) -> None:
    """The plain contents of the LUKS2 volume on `device` (a block device or file) in `output`."""
    metadata = json.loads(
        run(["cryptsetup", "luksDump", "--dump-json-metadata", device], capture=True).stdout
    )
    segment = metadata["segments"]["0"]
    if segment["encryption"] != "aes-xts-plain64" or int(segment["iv_tweak"]) != 0:
        raise ValueError(f"unexpected LUKS2 segment: {segment}")
    sector = int(segment["sector_size"])
    offset = int(segment["offset"])
    key = volume_key(device, passphrase, output.parent)
    with device.open("rb") as source, output.open("wb") as plain:
        source.seek(offset)
        position = 0  # in the data segment
        while chunk := source.read(_CHUNK):
            if chunk.count(0) != len(chunk):
                out = bytearray()
                for at in range(0, len(chunk), sector):
                    number = (position + at) // sector
                    tweak = number.to_bytes(16, "little")
                    decryptor = Cipher(algorithms.AES(key), modes.XTS(tweak)).decryptor()
                    out += decryptor.update(chunk[at : at + sector]) + decryptor.finalize()
                plain.seek(position)
                plain.write(out)
            position += len(chunk)
        plain.truncate(position)
