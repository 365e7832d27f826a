"""The push: the allow-listed files in one commit to a repo that is private unless asked otherwise."""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import (
    HfHubHTTPError,
    HTTPError,
    LocalTokenNotFoundError,
    OfflineModeIsEnabled,
)

from ..cli import UsageError
from ..utils import atomic_write_text
from .card import build_card, card_files, keep_sections, raw_config
from .privacy import (
    CARD,
    EVAL_SUMMARY,
    MANIFEST,
    TRAINING_CONFIG,
    check_published,
    files_to_upload,
    local_paths,
    scrub_config,
)


def hub_error(err: Exception, repo_id: str, folder: Path) -> UsageError:
    kept = f"nothing was uploaded and {folder.name}/ is unchanged"
    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, OfflineModeIsEnabled):
        why = "offline mode is on (HF_HUB_OFFLINE=1); unset it to push"
    elif isinstance(err, LocalTokenNotFoundError) or status == 401:
        why = "not logged in or the token is invalid: run `hf auth login`, set HF_TOKEN or pass --token"
    elif status == 403:
        why = f"the token may not write to {repo_id!r}: use a token with write access to that namespace"
    elif isinstance(err, HfHubHTTPError):
        why = f"the Hub answered HTTP {status}"
    else:
        why = f"the Hub is unreachable ({type(err).__name__})"
    return UsageError(f"cannot push to {repo_id}: {why}; {kept}")


def push_to_hub(output_dir, repo_id: str, private: bool = True, token: str | None = None,
                commit_message: str = "Upload LungGen DDPM pipeline, model card and manifest", eval_dir=None,
                fidelity_dir=None, utility_dir=None, reader_study_dir=None) -> str:
    """Create the repo (private unless told otherwise) and upload the allow-listed files in one commit.

    The card is rebuilt for `repo_id` (with the sections of the given dirs, else those kept from the last card) and
    the config is sent scrubbed, both from memory; README.md is written locally only after the upload succeeded, so
    a failed push leaves the output folder as it was."""
    folder = Path(output_dir)
    if not (folder / "model_index.json").is_file():
        raise UsageError(f"{folder}: no model_index.json; give a folder exported by training")
    card, summary, sections = build_card(folder, None, repo_id, eval_dir, fidelity_dir, utility_dir,
                                         reader_study_dir)
    generated = card_files(folder, card, summary)
    raw = raw_config(folder)
    paths = local_paths(raw, folder)
    if raw:
        generated[TRAINING_CONFIG] = json.dumps(scrub_config(raw), indent=2, sort_keys=True) + "\n"
        check_published(generated[TRAINING_CONFIG], paths, TRAINING_CONFIG)
    check_published((folder / MANIFEST).read_text(), paths, MANIFEST)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name))
                  for name in files_to_upload(folder) if name not in generated]
    operations += [CommitOperationAdd(path_in_repo=name, path_or_fileobj=text.encode())
                   for name, text in generated.items()]
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.create_commit(repo_id, operations, commit_message=commit_message)
    except (OSError, HTTPError) as err:  # OfflineModeIsEnabled, HfHubHTTPError and no-token are OSErrors
        raise hub_error(err, repo_id, folder) from None
    for name in (CARD, EVAL_SUMMARY):
        if name in generated:
            atomic_write_text(folder / name, generated[name])
    keep_sections(folder, sections)
    return str(url)
