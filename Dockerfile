# The Control Center image: one image, two roles (web: daphne; worker: gatewayworker).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml ./
RUN python -m venv /venv && /venv/bin/pip install --no-cache-dir --upgrade pip
COPY . .
RUN /venv/bin/pip install --no-cache-dir .
# Static files are collected at build time, with a throwaway key (never used at run time).
RUN DJANGO_SECRET_KEY=collectstatic-only CONTROLCENTER_DATA_DIR=/tmp/data \
    /venv/bin/python manage.py collectstatic --noinput -v0

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 controlcenter
COPY --from=build /venv /venv
COPY --from=build --chown=controlcenter /src /app
WORKDIR /app
USER controlcenter
ENV PATH=/venv/bin:$PATH PYTHONUNBUFFERED=1 CONTROLCENTER_DATA_DIR=/app/data
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status == 200 else 1)"]
CMD ["daphne", "-b", "0.0.0.0", "-p", "8000", "--proxy-headers", "controlcenter.asgi:application"]
