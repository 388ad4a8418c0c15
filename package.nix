# The agent as a package: autodeploy.py run by a Python 3 with a PATH holding
# nix, systemd, kexec-tools and openssh. Shared by module.nix (the default of
# system.autoDeploy.package) and flake.nix (packages.<system>.default).
{
  lib,
  stdenvNoCC,
  makeWrapper,
  python3,
  nix,
  systemd,
  kexec-tools,
  openssh,
  # The unit tests in tests/test_unit.py need neither root nor network.
  doCheck ? true,
}:

let
  runtimePath = [
    nix
    systemd
    openssh
  ]
  ++ lib.optional (lib.meta.availableOn stdenvNoCC.hostPlatform kexec-tools) kexec-tools;
in
stdenvNoCC.mkDerivation {
  pname = "nixos-autodeploy";
  version = "0.1.0";

  src = lib.fileset.toSource {
    root = ./.;
    fileset = lib.fileset.unions [
      ./autodeploy.py
      (lib.fileset.fileFilter (file: file.hasExt "py") ./tests)
    ];
  };

  nativeBuildInputs = [ makeWrapper ];
  nativeCheckInputs = [ (python3.withPackages (ps: [ ps.pytest ])) ];

  dontConfigure = true;
  dontBuild = true;

  inherit doCheck;
  checkPhase = ''
    runHook preCheck
    python3 -m pytest -q tests/test_unit.py
    runHook postCheck
  '';

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
    ${lib.getExe python3} -m compileall -q --invalidation-mode unchecked-hash $libexec/autodeploy.py
    # --prefix, not --set: health checks and hooks are operator commands that
    # may need the rest of the service's PATH.
    makeWrapper ${lib.getExe python3} $out/bin/nixos-autodeploy \
      --add-flags $libexec/launcher.py \
      --prefix PATH : ${lib.makeBinPath runtimePath}
    runHook postInstall
  '';

  meta = {
    description = "Pull-based NixOS deployment agent";
    license = lib.licenses.mit;
    platforms = lib.platforms.linux;
    mainProgram = "nixos-autodeploy";
  };
}
