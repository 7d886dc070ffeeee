"""Starts a moto server on 127.0.0.1 for the integration tests.

    python moto_launcher.py PORT

moto 5.2.5 writes only the first 36 bytes of the key id into its ciphertext header. Its
multi-Region key ids are "mrk-" + a 36-character UUID (40 bytes), so they are truncated
and Decrypt under mrk- keys fails. We widen the header to 40 bytes before the server starts.
The ordinary 36-character key ids are then NUL-padded to 40 in the header, so reading it
back strips the padding (without that, Decrypt under a non-mrk key fails with
AccessDeniedException).

With KMSGUARD_MOTO_KEY_AGE_SECS=N in the environment, KMS stamps keys it creates N seconds
in the past (CreationDate), so tests can have keys older than a posture period without
waiting; nothing else moves. Everything else is stock moto.
"""
import os
import sys

import moto.kms.utils as kms_utils

kms_utils.KEY_ID_LEN = 40
kms_utils.HEADER_LEN = kms_utils.KEY_ID_LEN + kms_utils.IV_LEN + kms_utils.TAG_LEN
kms_utils.CIPHERTEXT_HEADER_FORMAT = f">{kms_utils.KEY_ID_LEN}s{kms_utils.IV_LEN}s{kms_utils.TAG_LEN}s"

_deserialize = kms_utils._deserialize_ciphertext_blob


def _deserialize_unpadded(ciphertext_blob):
    ct = _deserialize(ciphertext_blob)
    return kms_utils.Ciphertext(
        key_id=ct.key_id.rstrip("\0"), iv=ct.iv, ciphertext=ct.ciphertext, tag=ct.tag
    )


kms_utils._deserialize_ciphertext_blob = _deserialize_unpadded

_age = float(os.environ.get("KMSGUARD_MOTO_KEY_AGE_SECS", "0") or 0)
if _age:
    import moto.kms.models as kms_models

    _unix_time = kms_models.unix_time

    def _aged_unix_time(dt=None):
        # Only "now" (CreationDate, RotationDate) is moved; explicit dates are not.
        return _unix_time(dt) if dt is not None else _unix_time() - _age

    kms_models.unix_time = _aged_unix_time

from moto.server import main  # noqa: E402  (after the patch, on purpose)

if __name__ == "__main__":
    port = sys.argv[1] if len(sys.argv) > 1 else "5000"
    main(["-H", "127.0.0.1", "-p", port])
