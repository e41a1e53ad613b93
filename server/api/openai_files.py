"""OpenAI's /v1/files for training files: upload (streamed, validated line by line), list,
retrieve, delete, content. Every endpoint needs the API key when one is configured.

The upload is read as it arrives (the guard streams it, counted against --max-upload-bytes):
each chunk goes to disk and through the line validator on a worker thread, so neither a
large file nor its validation holds the event loop or memory. A file with invalid lines is
refused (400) naming them, and nothing of it is kept.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from server.api.deps import EngineDep, SettingsDep, require_key
from server.api.guards import BodyTooLarge
from server.api.multipart import FormReader
from server.api.openai_schemas import (
    FileDeleted,
    FileObject,
    ListPage,
    OpenAIError,
    line_validator,
    page,
)
from server.engine.files import FILE_ID, FileStore, InvalidFile, StoredFile, Upload

router = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])


def _store(engine) -> FileStore:
    if engine.files is None:
        raise OpenAIError(503, "this server keeps no files", kind="server_error")
    return engine.files


def _file(store: FileStore, file_id: str) -> StoredFile:
    f = store.get(file_id) if FILE_ID.fullmatch(file_id) else None
    if f is None:
        raise OpenAIError(404, f"No such File object: {file_id}", "id")
    return f


def file_object(f: StoredFile) -> FileObject:
    return FileObject(id=f.id, bytes=f.bytes, created_at=f.created_ns // 10**9,
                      filename=f.filename, purpose=f.purpose)


def _filename(name: str) -> str:
    name = PurePosixPath(name.replace("\\", "/")).name
    return "".join(c for c in name if c.isprintable())[:255] or "upload.jsonl"


@router.post("/files", response_model=FileObject)
async def upload_file(request: Request, engine: EngineDep, settings: SettingsDep
                      ) -> FileObject:
    store = _store(engine)
    validate = line_validator(settings.max_messages_per_example,
                              settings.max_chars_per_example)
    upload: Upload | None = None
    purpose: str | None = None
    try:
        form = FormReader(request.headers.get("content-type", ""))
        async for chunk in request.stream():
            data = []
            for kind, part, *rest in form.feed(chunk):
                if kind == "begin" and part.filename is not None:
                    if upload is not None or part.name != "file":
                        raise ValueError("expected one file, in the field 'file'")
                    upload = await run_in_threadpool(store.begin, _filename(part.filename),
                                                     "fine-tune", validate)
                elif kind == "data":
                    data.append(rest[0])
                elif kind == "end" and part.filename is None and part.name == "purpose":
                    purpose = b"".join(part.data).decode("utf-8", "replace")
            if data:
                await run_in_threadpool(upload.write, b"".join(data))
        form.close()
        if purpose != "fine-tune":
            raise OpenAIError(400, "purpose must be 'fine-tune': this server keeps training "
                                   f"files only (got {purpose!r})", "purpose")
        if upload is None:
            raise ValueError("no file in the field 'file'")
        return file_object(await run_in_threadpool(upload.finish))
    except InvalidFile as exc:
        raise OpenAIError(400, str(exc), "file", "invalid_file_format") from None
    except BodyTooLarge as exc:
        raise OpenAIError(413, str(exc), "file") from None
    except OSError as exc:
        raise OpenAIError(507, f"the file could not be stored: {exc.strerror or exc}",
                          kind="server_error") from None
    except (ValueError, ClientDisconnect) as exc:
        raise OpenAIError(400, f"not a valid upload: {exc}", "file") from None
    finally:
        if upload is not None and upload.part.exists():
            upload.abort()


@router.get("/files", response_model=ListPage[FileObject])
def list_files(engine: EngineDep, after: str | None = None,
               limit: int = Query(10000, ge=1, le=10000),
               order: Literal["asc", "desc"] = "desc", purpose: str | None = None) -> dict:
    files = [f for f in _store(engine).list() if purpose in (None, f.purpose)]
    if order == "desc":
        files.reverse()
    result = page(files, after, limit, "file")
    result["data"] = [file_object(f) for f in result["data"]]
    return result


@router.get("/files/{file_id}", response_model=FileObject)
def retrieve_file(file_id: str, engine: EngineDep) -> FileObject:
    return file_object(_file(_store(engine), file_id))


@router.delete("/files/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, engine: EngineDep) -> FileDeleted:
    store = _store(engine)
    _file(store, file_id)
    if engine.jobs is not None and engine.jobs.uses_file(file_id):
        raise OpenAIError(409, f"file {file_id} is the training file of a job that has not "
                               "finished; cancel the job first", "file_id")
    return FileDeleted(id=file_id, deleted=store.delete(file_id))


@router.get("/files/{file_id}/content")
def file_content(file_id: str, engine: EngineDep) -> FileResponse:
    store = _store(engine)
    f = _file(store, file_id)
    return FileResponse(store.data_path(f.id), media_type="application/octet-stream",
                        filename=f.filename)
