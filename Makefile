# The two set-up commands of the README are `make run` and `make test`.
.PHONY: run test models openapi lint

run:
	scripts/run.sh

test:
	scripts/test.sh

models:
	scripts/bootstrap.sh test
	.venv/bin/python -m training.ehr_heart_disease
	.venv/bin/python -m training.cxr_pneumonia

openapi:
	scripts/bootstrap.sh run
	.venv/bin/medinfer openapi --output docs/openapi.json

lint:
	.venv/bin/ruff format --check . && .venv/bin/ruff check . && .venv/bin/mypy app migrations && .venv/bin/lint-imports
