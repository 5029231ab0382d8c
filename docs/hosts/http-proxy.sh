toolwarden run --listen 127.0.0.1:8931 --auth-token-file ~/.config/toolwarden/tokens --metrics-addr 127.0.0.1:9464 -- npx -y @modelcontextprotocol/server-everything stdio
