"""/v1/jobs: submit, list, inspect, cancel, trials, model download, report."""

from __future__ import annotations

import io
import json
import zipfile
from typing import Annotated, Literal, TypeVar

from fastapi import APIRouter, File, Form, Path, Query, UploadFile, status
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ValidationError

from prunepilot.compression import export_format
from prunepilot.compression.artifacts import REPORT_FILE, SOURCE_FILE, SPEC_FILE, WEIGHTS_FILE, read_spec

from ..db.lifecycle import JobStatus
from ..jobs import InvalidJob, UploadedFile
from ..schemas import JobAccepted, JobCreate, JobPublic, Page, TrialPublic
from .deps import JobsDep, PrincipalDep, owner_of
from .errors import AUTHED, responses

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
ERRORS = responses(*AUTHED, 404)

# Identifiers and filters are checked here, before they reach SQL: PostgreSQL refuses a NUL in text with
# an error, and an id that cannot exist needs no lookup. Job ids are uuid4().hex.
JobId = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$", description="the job's id: 32 lowercase hex digits")]
Filter = Annotated[str | None, Query(pattern=r"^[\w.:-]{1,64}$")]


# A real spec nests four levels deep (budget.constraints[0].ratio); agent options add a few. Deeper input
# only costs recursion: past the interpreter's limit the parser (or a later json.dumps) raises RecursionError.
MAX_SPEC_DEPTH = 32


def _depth(value: object) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(node, dict):
            stack.extend((v, level + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, level + 1) for v in node)
    return deepest


SpecT = TypeVar("SpecT", bound=BaseModel)


def _parse_spec(raw: str, schema: type[SpecT]) -> SpecT:
    """A multipart ``spec`` part, parsed once into its schema; every problem is one 422 naming the field."""
    too_deep = InvalidJob(f"spec is nested more than {MAX_SPEC_DEPTH} levels deep")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidJob(f"spec is not valid JSON: {exc}") from None
    except RecursionError:
        raise too_deep from None
    if _depth(data) > MAX_SPEC_DEPTH:
        raise too_deep
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        msgs = [f"{'.'.join(str(p) for p in e['loc']) or 'spec'}: {e['msg']}" for e in exc.errors()]
        raise InvalidJob("invalid spec: " + "; ".join(msgs)) from None


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=JobAccepted,
             responses=responses(*AUTHED, 400, 413, 429),
             summary="Submit a pruning job",
             description="Multipart form: `spec` (JSON, see JobCreate); the model as `weights` (state dict or safetensors for "
                         "spec.arch a built-in, `timm:` or `plugin:` name) or as `model` (an ONNX file, with spec.arch 'onnx'); "
                         "optional `dataset` (ImageFolder zip, with spec.dataset = 'upload'). Answers 202 with the job's links.")
def submit_job(
    jobs: JobsDep,
    principal: PrincipalDep,
    spec: Annotated[str, Form(description="JobCreate as JSON", examples=[json.dumps(JobCreate.model_config["json_schema_extra"]["examples"][0])])],
    weights: Annotated[UploadFile | None, File(description="state dict (.pt/.th) or .safetensors (not with `model`)")] = None,
    dataset: Annotated[UploadFile | None, File(description="ImageFolder zip when spec.dataset is 'upload'")] = None,
    model: Annotated[UploadFile | None, File(description="an ONNX file (opset >= 13, one image input) when spec.arch is 'onnx'")] = None,
) -> JSONResponse:
    parsed = _parse_spec(spec, JobCreate)
    job = jobs.submit(owner_of(principal), parsed, file_part(weights, "weights"), file_part(dataset, "dataset.zip"),
                      file_part(model, "model.onnx"))
    body = JobAccepted(id=job.id, status=job.status, links=job.links)
    return JSONResponse(body.model_dump(mode="json"), status_code=202, headers={"Location": job.links.self})


def file_part(upload: UploadFile | None, default_name: str) -> UploadedFile | None:
    return UploadedFile(upload.file, upload.filename or default_name) if upload is not None else None


@router.get("", response_model=Page[JobPublic], responses=ERRORS, summary="List your jobs")
def list_jobs(
    jobs: JobsDep, principal: PrincipalDep,
    status_: Annotated[JobStatus | None, Query(alias="status")] = None,
    agent: Filter = None, problem_key: Filter = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50, offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
) -> Page[JobPublic]:
    items, total = jobs.list_jobs(owner_of(principal), status_, agent, problem_key, limit, offset)
    return Page[JobPublic](items=items, total=total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobPublic, responses=ERRORS, summary="Status, progress, best so far, timings, error")
def get_job(job_id: JobId, jobs: JobsDep, principal: PrincipalDep) -> JobPublic:
    return jobs.get(owner_of(principal), job_id)


@router.post("/{job_id}/cancel", response_model=JobPublic, status_code=202, responses={**ERRORS, **responses(409)}, summary="Cancel a job")
def cancel_job(job_id: JobId, jobs: JobsDep, principal: PrincipalDep) -> JobPublic:
    return jobs.cancel(owner_of(principal), job_id)


@router.get("/{job_id}/trials", response_model=Page[TrialPublic], responses=ERRORS, summary="The job's trials, in order")
def list_trials(
    job_id: JobId, jobs: JobsDep, principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=5000)] = 100, offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0, kind: Filter = None,
) -> Page[TrialPublic]:
    items, total = jobs.trials(owner_of(principal), job_id, limit, offset, kind)
    return Page[TrialPublic](items=items, total=total, limit=limit, offset=offset)


@router.get("/{job_id}/report", responses={**ERRORS, **responses(409)}, summary="Final report: dense vs pruned, measured",
            description="The final figures (`figures`: test accuracy, MACs, parameters, size and latency per batch size, "
                        "dense and pruned, measured in the same run on the job's latency target) and `budget_check`: per "
                        "budgeted resource, its `limit` and `measured` usage (shares of dense; latency at the budget's batch "
                        "size), the constraint's `tolerance`, and whether the final network `met` it as measured.")
def get_report(job_id: JobId, jobs: JobsDep, principal: PrincipalDep) -> dict:
    return jobs.report(owner_of(principal), job_id)


@router.get("/{job_id}/model", responses={**ERRORS, **responses(409), 200: {"content": {"application/zip": {}, "application/octet-stream": {}}}},
            summary="Download the pruned model",
            description="`state_dict`: a zip of model.safetensors + spec.json + report.json (+ source.onnx for an ONNX source; rebuild "
                        "with prunepilot.compression.load_artifact); `pt2`: a torch.export program; `onnx`: an ONNX model, checked "
                        "against the torch model in ONNX Runtime. Default: `onnx` for a job whose model was an ONNX file, else `state_dict`.")
def get_model(job_id: JobId, jobs: JobsDep, principal: PrincipalDep,
              format: Literal["state_dict", "pt2", "onnx"] | None = None) -> Response:  # noqa: A002 - the public query name
    path = jobs.model_dir(owner_of(principal), job_id)
    if format is None:
        format = "onnx" if read_spec(path).source_file is not None else "state_dict"  # noqa: A001
    if format == "state_dict":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for name in (WEIGHTS_FILE, SPEC_FILE, REPORT_FILE, SOURCE_FILE):
                if (path / name).is_file():
                    z.write(path / name, name)
        return Response(buf.getvalue(), media_type="application/zip",
                        headers={"Content-Disposition": f'attachment; filename="prunepilot-{job_id}.zip"'})
    target = export_format(path, format)
    return FileResponse(target, media_type="application/octet-stream", filename=f"prunepilot-{job_id}.{format}")
