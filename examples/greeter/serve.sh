#!/bin/sh
# Serve on 127.0.0.1:$PORT in the foreground (the container runs with host networking).
exec /bin/httpd -f -v -p "0.0.0.0:${PORT:-8080}" -h /www
