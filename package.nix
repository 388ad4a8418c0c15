# The agent as a package: autodeploy.py run by a Python 3 with a PATH holding
# nix, systemd, kexec-tools and openssh. Shared by module.nix (the default of
# system.autoDeploy.package) and flake.nix (packages.<system>.default); written
# to be callPackage'd by nixpkgs as it is.
{
  lib,
  stdenvNoCC,
  makeWrapper,
  python3,
  nix,
  systemd,
  kexec-tools,
  openssh,
}:

let
  runtimePath = [
    nix
    systemd
    openssh
  ]
  ++ lib.optional (lib.meta.availableOn stdenvNoCC.hostPlatform kexec-tools) kexec-tools;
  # Bytecode is compiled at build time by the *build* platform's Python of the
  # same version (python3 itself may not run there when cross-compiling); the
  # .pyc files are platform-independent.
  buildPython = python3.pythonOnBuildForHost;
in
stdenvNoCC.mkDerivation {
  pname = "nixos-autodeploy";
  version = "0.1.0";

  src = lib.fileset.toSource {
    root = ./.;
    fileset = lib.fileset.unions [
      ./autodeploy.py
      (lib.fileset.fileFilter (file: file.hasExt "py") ./tests)
      # tests/test_unit.py checks the decision and hold tables shown there
      ./README.md
      ./docs/design/lifecycle.md
    ];
  };

  strictDeps = true;
  nativeBuildInputs = [
    makeWrapper
    buildPython
  ];

  dontConfigure = true;
  dontBuild = true;

  # The unit tests (tests/test_unit.py: no root, no network, no Nix) through
  # the usual hook; it runs after the install phase, on the build platform,
  # and is skipped when cross-compiling (doCheck needs to run host code).
  doCheck = true;
  nativeCheckInputs = [ python3.pkgs.pytestCheckHook ];
  pytestFlags = [ "tests/test_unit.py" ];

  # autodeploy.py is installed as a module with its bytecode compiled at build
  # time, and started by a three-line launcher: run as a script, Python would
  # compile all of it again on every start (about 9 ms of each poll; the store
  # is read-only, so no __pycache__ could be written at run time).
  installPhase = ''
    runHook preInstall
    libexec=$out/libexec/nixos-autodeploy
    install -Dm0644 autodeploy.py $libexec/autodeploy.py
    cat > $libexec/launcher.py <<EOF
    import sys
    sys.path.insert(0, "$libexec")
    import autodeploy
    sys.exit(autodeploy.main())
    EOF
    # unchecked-hash: the store's normalised mtimes must not invalidate it.
    ${buildPython.interpreter} -m compileall -q --invalidation-mode unchecked-hash $libexec/autodeploy.py
    # --prefix, not --set: health checks and hooks are operator commands that
    # need the rest of the service's PATH (system.autoDeploy.path).
    makeWrapper ${lib.getExe python3} $out/bin/nixos-autodeploy \
      --add-flags $libexec/launcher.py \
      --prefix PATH : ${lib.makeBinPath runtimePath}
    runHook postInstall
  '';

  meta = {
    description = "Pull-based NixOS deployment agent";
    # The same placeholder as the README's flake input: the project's address.
    homepage = "https://github.com/OWNER/nixos-autodeploy";
    license = lib.licenses.mit;
    platforms = lib.platforms.linux;
    mainProgram = "nixos-autodeploy";
  };
}
