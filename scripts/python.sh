# Sourced by install.sh and launch.sh: which Python interpreter to use.

# $PYTHON if set, else python, else python3 (Debian and Ubuntu install only python3).
crlft_python() {
    if [[ -n "${PYTHON:-}" ]]; then
        echo "$PYTHON"
    elif command -v python >/dev/null 2>&1; then
        echo python
    elif command -v python3 >/dev/null 2>&1; then
        echo python3
    else
        echo "neither python nor python3 is on PATH; set PYTHON=/path/to/python" >&2
        return 1
    fi
}
