"""HTTP request/response schemas (pydantic lives at the edges, never in the domain)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Generic, Literal, TypeVar
from uuid import UUID

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from application.services import MAX_DEVICE_HASH
from domain.contracts.edits import Action
from domain.job import MAX_ITEMS
from domain.rule import MAX_RULE_NAME
from domain.text import storable_text

T = TypeVar("T")

# Every string a client sends is text PostgreSQL can store and a person can read (no NUL, no
# lone surrogates, no controls but tab and newlines, no non-characters): refused here with a
# 422, never found by the projector.
Text = Annotated[str, AfterValidator(storable_text)]
Name = Field(min_length=1, max_length=MAX_RULE_NAME)
ConceptName = Annotated[Text, Field(min_length=1, max_length=64)]



def _decimal_digits(value: object) -> object:
    """A number in a query string is its decimal digits: pydantic's lax int reads "5.0", "+5",
    " 5 " and "5_0" as 5 and 50, a request nobody writes on purpose."""
    if isinstance(value, str) and not (value.isascii() and value.isdigit()):
        raise ValueError("must be a whole number in decimal digits")
    return value


QueryInt = Annotated[int, BeforeValidator(_decimal_digits)]  # with the route's own Query(ge=..., le=...)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(BaseModel):
    code: str
    message: str
    details: dict[str, object] | None = None


class Meta(BaseModel):
    request_id: str
    timestamp: datetime


class Envelope(BaseModel, Generic[T]):
    success: bool
    data: T | None = None
    error: ErrorBody | None = None
    meta: Meta


# -- health / auth / me / presets ---------------------------------------------------------
class HealthPublic(BaseModel):
    status: Literal["ok", "degraded"]
    dependencies: dict[str, Literal["ok", "failing"]]


class AnonCreate(Strict):
    device_hash: str = Field(min_length=8, max_length=MAX_DEVICE_HASH, pattern=r"^[A-Za-z0-9._:-]+$")


class TokenPublic(BaseModel):
    token: str
    user_id: UUID
    created: bool


class RuleSlots(BaseModel):
    used: int
    max: int


class ErasedPublic(BaseModel):
    erased: bool
    objects_deleted: int
    webhooks_deleted: int
    finished: bool = True  # False (a 202): objects are left, which the sweeper deletes within minutes


class MePublic(BaseModel):
    user_id: UUID
    plan: str
    credits: int
    reserved: int
    active_jobs: int
    max_concurrent_jobs: int
    rule_slots: RuleSlots


class PresetPublic(BaseModel):
    id: str
    name: str
    concepts: list[str]
    actions: list[str]
    tones: list[str]
    textures: list[str]


# -- rules -------------------------------------------------------------------------------
class ConceptEdit(Strict):
    action: Action
    value: Text | None = Field(default=None, max_length=32)


class RuleCreate(Strict):
    name: Text = Name
    preset_id: Text = Field(min_length=1, max_length=32)
    concepts: dict[ConceptName, ConceptEdit] = Field(min_length=1, max_length=32)
    protect: list[ConceptName] = Field(default_factory=list, max_length=32)


class RuleUpdate(Strict):
    name: Text = Name
    concepts: dict[ConceptName, ConceptEdit] = Field(min_length=1, max_length=32)
    protect: list[ConceptName] = Field(default_factory=list, max_length=32)


class RulePublic(BaseModel):
    id: UUID
    name: str
    preset_id: str
    concepts: dict[str, dict[str, str]]
    protect: list[str]
    version: int  # the rule's stream version: its ETag, "<version>", for If-Match on PUT/DELETE


class RuleList(BaseModel):
    items: list[RulePublic]


# -- jobs --------------------------------------------------------------------------------
class JobCreate(Strict):
    preset: Text = Field(min_length=1, max_length=32)
    item_count: int = Field(strict=True, ge=1, le=MAX_ITEMS)  # 3, not "3", true or 3.0


class UploadSlot(BaseModel):
    idx: int
    url: str
    key: str
    method: Literal["PUT"] = "PUT"
    content_type: str


class JobCreatedPublic(BaseModel):
    job_id: UUID
    upload: list[UploadSlot]
    confirm_url: str
    expires_in: int


class JobExecute(Strict):
    concepts: dict[ConceptName, ConceptEdit] = Field(default_factory=dict, max_length=32)
    protect: list[ConceptName] | None = Field(default=None, max_length=32)
    rule_id: UUID | None = None
    # The original API's field (ARCHITECTURE §3), which nothing ever used: taken, never recorded.
    output_template: Text | None = Field(default=None, max_length=200)


class Progress(BaseModel):
    done: int
    failed: int
    total: int


def _absent(value: object) -> bool:
    return value is None


class ItemPublic(BaseModel):
    idx: int
    status: Literal["pending", "done", "failed"]
    output_url: str | None = None
    preview_url: str | None = None
    error: str | None = None
    # Done items only (absent otherwise): the masks the worker used, by concept, and their instances.
    mask_urls: dict[str, str] | None = Field(default=None, exclude_if=_absent)
    instances_url: str | None = Field(default=None, exclude_if=_absent)


class JobPublic(BaseModel):
    job_id: UUID
    status: str
    preset: str
    progress: Progress
    concepts: dict[str, dict[str, str]]
    protect: list[str]
    rule_id: UUID | None
    items: list[ItemPublic]
    objects_expired: bool = False  # its objects deleted past retention: its items have no links


class MaskSlot(BaseModel):
    """Where a client may put its own mask for an item's concept (a PNG, white = the concept)."""

    idx: int
    concept: str
    url: str
    key: str
    method: Literal["PUT"] = "PUT"
    copied: bool  # the source job's mask for it is there already (overwrite it to correct it)


class JobRerunPublic(BaseModel):
    job_id: UUID
    source_job_id: UUID
    inputs_copied: int
    masks: list[MaskSlot]
    confirm_url: str
    expires_in: int


class JobStatePublic(BaseModel):
    job_id: UUID
    status: str


class JobSummary(BaseModel):
    job_id: UUID
    status: str
    preset: str
    rule_id: UUID | None
    total_items: int
    done_items: int
    failed_items: int
    created_at: datetime
    finished_at: datetime | None


class JobList(BaseModel):
    items: list[JobSummary]
    next_cursor: str | None


class CallbackCreate(Strict):
    idx: int = Field(strict=True, ge=0, le=199)
    status: Literal["done", "failed"]
    output_key: Text | None = Field(default=None, max_length=300)
    preview_key: Text | None = Field(default=None, max_length=300)
    error: Text | None = Field(default=None, max_length=2000)
    idempotency_key: Text = Field(min_length=1, max_length=120)


class CallbackPublic(BaseModel):
    outcome: str
    idx: int
    item_status: str
    job_status: str | None
