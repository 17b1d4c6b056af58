FROM python:3.11-slim-bookworm
RUN useradd --system --home /var/lib/dicom-mail-gateway gateway
WORKDIR /opt/dicom-mail-gateway
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install --no-cache-dir .
USER gateway
VOLUME ["/data/d", "/data/e", "/etc/dicom-mail-gateway"]
EXPOSE 11112
ENTRYPOINT ["dicom-mail-gateway"]
CMD ["run", "-c", "/etc/dicom-mail-gateway/gateway.toml"]
