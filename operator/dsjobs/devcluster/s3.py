"""Settings of the dev cluster's S3 endpoint, as written to s3.env / s3.json."""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

from dsjobs.devcluster.files import write_private

DEFAULT_BUCKET = "dsjobs"
REGION = "us-east-1"


@dataclass(frozen=True)
class S3Config:
    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    region: str = REGION

    @classmethod
    def generate(cls, port: int, bucket: str = DEFAULT_BUCKET) -> S3Config:
        # Fresh keys per cluster: nothing may come to rely on fixed dev keys.
        return cls(
            endpoint=f"http://127.0.0.1:{port}",
            bucket=bucket,
            access_key="DSJOBSDEV" + secrets.token_hex(6).upper(),
            secret_key=secrets.token_urlsafe(30),
        )

    def env(self) -> dict[str, str]:
        """DSJOBS_S3_* for dsjobs, plus the standard AWS_* names so that boto3
        and the aws CLI pick the endpoint up from a sourced s3.env too."""
        return {
            "DSJOBS_S3_ENDPOINT": self.endpoint,
            "DSJOBS_S3_BUCKET": self.bucket,
            "DSJOBS_S3_REGION": self.region,
            "DSJOBS_S3_ACCESS_KEY": self.access_key,
            "DSJOBS_S3_SECRET_KEY": self.secret_key,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def write(self, env_path: Path, json_path: Path) -> None:
        for path, text in (
            (env_path, "".join(f"{k}={v}\n" for k, v in self.env().items())),
            (json_path, json.dumps(asdict(self), indent=2) + "\n"),
        ):
            write_private(path, text)

    @classmethod
    def read(cls, json_path: Path) -> S3Config:
        return cls(**json.loads(json_path.read_text()))


@dataclass(frozen=True)
class ScopedKey:
    """A key pair the dev S3 server accepts only for objects under `prefix`."""

    access_key: str
    secret_key: str
    prefix: str


def scoped_key(path: Path, prefix: str) -> ScopedKey:
    """The key pair of `prefix` in the server's scoped keys file, made (and the file rewritten
    atomically, 0600) when it has none yet; the server picks the change up by itself."""
    entries: list[dict[str, str]] = json.loads(path.read_text()) if path.exists() else []
    for e in entries:
        if e.get("prefix") == prefix:
            return ScopedKey(e["accessKey"], e["secretKey"], prefix)
    key = ScopedKey("DSJOBSP" + secrets.token_hex(6).upper(), secrets.token_urlsafe(30), prefix)
    entries.append({"accessKey": key.access_key, "secretKey": key.secret_key, "prefix": prefix})
    write_private(path, json.dumps(entries, indent=2) + "\n")
    return key
