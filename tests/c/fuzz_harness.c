/* Runs the harness (mt_main.c's harness_main) once per input, each in a forked child with a 10 s alarm, to fuzz the
 * C program's file readers under AddressSanitizer + UBSan.
 *
 *   fuzz_harness MANIFEST     one input per line: "r PATH" (a record file: train on it, then predict it) or
 *                             "s PATH" (a state file: load it, then save the state into a new file)
 *
 * Prints "ok PATH" (exit 0), "refused PATH" (exit 1 with one error line) or "FINDING PATH status" per input, then a
 * summary line. Build mt_io_host.c with -Dmain=mt_host_main so this file's main is the program's. */
#define _DEFAULT_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

int harness_main(int argc, char **argv);

int main(int argc, char **argv) {
  if (argc < 2) return 2;
  FILE *m = fopen(argv[1], "r");
  if (!m) return 2;
  char line[4096];
  long ok = 0, refused = 0, findings = 0;
  while (fgets(line, sizeof line, m)) {
    line[strcspn(line, "\n")] = 0;
    if (strlen(line) < 3) continue;
    char *path = line + 2;
    fflush(stdout);
    unlink("fuzz_out.bin");
    pid_t pid = fork();
    if (pid == 0) {
      alarm(10);
      int null = open("/dev/null", O_WRONLY);
      dup2(null, 1);
      char *rec[] = {"prog", "-q", "-n", "4", "-o", "fuzz_out.bin", "-e", path, "-p", "fuzz_pred.bin", path, 0};
      char *st[] = {"prog", "-i", path, "-o", "fuzz_out.bin", 0};
      _exit(line[0] == 'r' ? harness_main(11, rec) : harness_main(5, st));
    }
    int status = 0;
    waitpid(pid, &status, 0);
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
      ok++;
      printf("ok %s\n", path);
    } else if (WIFEXITED(status) && WEXITSTATUS(status) == 1) {
      refused++;
      printf("refused %s\n", path);
    } else {
      findings++;
      printf("FINDING %s %s %d\n", path, WIFSIGNALED(status) ? "signal" : "exit",
             WIFSIGNALED(status) ? WTERMSIG(status) : WEXITSTATUS(status));
    }
  }
  fclose(m);
  printf("summary inputs %ld ok %ld refused %ld findings %ld\n", ok + refused + findings, ok, refused, findings);
  return findings ? 1 : 0;
}
