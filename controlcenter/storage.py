from __future__ import annotations

from typing import Any

from whitenoise.storage import CompressedManifestStaticFilesStorage


class ManifestStaticFilesStorage(CompressedManifestStaticFilesStorage):  # type: ignore[misc]
    """Hashed, compressed names once `collectstatic` has run (the Docker image does it);
    plain names before that, so a fresh checkout serves pages without a build step
    (WhiteNoise then serves the files straight from the app folders)."""

    manifest_strict = False

    def hashed_name(
        self, name: str, content: Any = None, filename: str | None = None
    ) -> str:
        try:
            return str(super().hashed_name(name, content, filename))
        except ValueError:
            return name
