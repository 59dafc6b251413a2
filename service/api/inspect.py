"""/v1/inspect: the prunability report of a model, before any job."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile

from ..schemas import InspectCreate, InspectPublic
from .deps import JobsDep, PrincipalDep
from .errors import AUTHED, responses
from .jobs import _parse_spec, file_part

router = APIRouter(tags=["jobs"])


@router.post("/v1/inspect", response_model=InspectPublic, responses=responses(*AUTHED, 400, 413),
             summary="Prunability report of a model",
             description="Multipart form: `spec` (JSON, see InspectCreate) and the model as in POST /v1/jobs (`weights` optional "
                         "here: random weights have the same structure; or `model`, an ONNX file). Lists the prunable channel groups, "
                         "the layers left whole and why, each resource's reachable floor, dense figures and the estimated search time; "
                         "nothing is stored.")
def inspect_model(
    jobs: JobsDep,
    principal: PrincipalDep,
    spec: Annotated[str, Form(description="InspectCreate as JSON",
                              examples=[json.dumps(InspectCreate.model_config["json_schema_extra"]["examples"][0])])],
    weights: Annotated[UploadFile | None, File(description="state dict (.pt/.th) or .safetensors (not with `model`)")] = None,
    model: Annotated[UploadFile | None, File(description="an ONNX file when spec.arch is 'onnx'")] = None,
) -> InspectPublic:
    parsed = _parse_spec(spec, InspectCreate)
    return InspectPublic.model_validate(jobs.inspect(parsed, file_part(weights, "weights"), file_part(model, "model.onnx")))
