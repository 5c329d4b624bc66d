"""`/api/admin`: what operators do, each action authenticated and written down (docs/rest.md, "Admin").

Every endpoint takes `OperatorDep` (`app.api.admin.auth`); every `POST` and
`DELETE` writes one audit row (`app.admin.audit.record`). Answers carry
`Cache-Control: no-store` (`app.api.middleware.no_store`) and the answer cache
never holds them.
"""

from fastapi import APIRouter

from app.api.admin import audit, corridors, held, refresh

router = APIRouter()
router.include_router(refresh.router)
router.include_router(audit.router)
router.include_router(corridors.router)
router.include_router(held.router)
