import os, subprocess, sys, time, socket
env = dict(os.environ, PREFECT_HOME="/tmp/prof/home2", PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED="false", PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false",
    PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED="false", PREFECT_SERVER_REGISTER_BLOCKS_ON_START="false", PREFECT_SERVER_MEMOIZE_BLOCK_AUTO_REGISTRATION="false",
    PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false")
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
p = subprocess.Popen(["/work/main/.venv/bin/prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
time.sleep(12)
import psutil
kids = psutil.Process(p.pid).children(recursive=True)
print("pids", p.pid, [k.pid for k in kids])
target = kids[0].pid if kids else p.pid
subprocess.run(["/work/main/.venv/bin/py-spy", "record", "-p", str(target), "-d", "15", "-r", "200", "-f", "raw", "-o", "/tmp/prof/srv.txt", "--nonblocking"], capture_output=True)
p.terminate(); p.wait()
