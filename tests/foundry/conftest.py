"""llm-foundry interop tests: they run where llm-foundry is installed (the Composer environment,
.venv-composer) and skip themselves elsewhere. Nothing in this file imports llm-foundry."""


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "foundry: needs llm-foundry (the Composer environment: .venv-composer, llm-foundry 0.22)"
    )
